"""Scaling out: data-parallel training under torchrun (2 CPU processes, gloo) takes the same steps as one
process, --resume works across a different number of processes, self-critical fine-tuning runs launched too,
and --shard splits inputs exactly."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_images

from capcli.data.shards import Shard

BIN = Path(sys.executable).parent
TOLERANCE = 1e-4  # 2 processes sum the same per-token losses in a different order: float rounding only


def train_command(data: Path, lm: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--split", str(data / "train.txt"), "--val-split", str(data / "dev.txt"),
            "--out", str(out), "--encoder", "tiny-random-cnn", "--lm", str(lm), "--prefix-length", "2",
            "--hidden-size", "16", "--batch-size", "12", "--warmup-steps", "2", "--features",
            str(data / "features"), *extra]


def run(launcher: list[str], args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


ONE_PROCESS = [sys.executable, "-m", "capcli"]
# The README's command, as a user types it: torchrun --standalone --nproc_per_node 2 -m capcli train ...
TWO_PROCESSES = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "capcli"]


def log(model: Path) -> list[dict]:
    return [json.loads(line) for line in (model / "train_log.jsonl").read_text().splitlines()]


def val_losses(model: Path) -> list[float]:
    return [r["val_loss"] for r in log(model) if "val_loss" in r]


def same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) > 0 and all(abs(x - y) < TOLERANCE for x, y in zip(a, b))


def test_two_processes_train_like_one_and_resume_with_a_different_number(shapes_data, tiny_lm, tmp_path):
    # Captions of different lengths, so that each process's share of a batch has its own token count.
    lines = (shapes_data / "captions.txt").read_text().splitlines()
    longer = [line if n % 3 else line.replace(' ."', ' . a red circle ."') for n, line in enumerate(lines)]
    (shapes_data / "captions.txt").write_text("\n".join(longer) + "\n")
    run(ONE_PROCESS, ["extract", "--data", str(shapes_data), "--out", str(shapes_data / "features"),
                      "--encoder", "tiny-random-cnn", "--quiet"])  # both runs then read one cache
    one, two = tmp_path / "one", tmp_path / "two"
    run(ONE_PROCESS, train_command(shapes_data, tiny_lm, one, "--epochs", "2"))
    result = run(TWO_PROCESSES, train_command(shapes_data, tiny_lm, two, "--epochs", "2"))
    assert "x 2 processes" in result.stderr  # the main process speaks, once
    assert result.stderr.count("training a mlp mapper") == 1
    assert same(val_losses(one), val_losses(two))  # after each epoch

    # Lengthen both runs by one epoch with one process: the 2-process checkpoint resumes like the other.
    run(ONE_PROCESS, train_command(shapes_data, tiny_lm, one, "--epochs", "3", "--resume"))
    run(ONE_PROCESS, train_command(shapes_data, tiny_lm, two, "--epochs", "3", "--resume"))
    assert same(val_losses(one), val_losses(two)) and len(val_losses(one)) == 3


def test_self_critical_fine_tuning_runs_data_parallel(tiny_data, tiny_model, tmp_path):
    out = tmp_path / "tuned"
    result = run(TWO_PROCESSES, ["train", "--data", str(tiny_data), "--out", str(out), "--init", str(tiny_model),
                                 "--objective", "cider", "--samples", "2", "--batch-size", "3", "--epochs", "1",
                                 "--warmup-steps", "1", "--features", str(tiny_data / "features")])
    assert "x 2 processes" in result.stderr and result.stderr.count("self-critical") == 1
    assert [r["step"] for r in log(out) if "val_loss" not in r][-1] == 3  # 8 images, 3 a step
    assert (out / "mapper.safetensors").is_file()


def test_shards_cover_every_input_exactly_once_whatever_the_listing():
    keys = [f"photos/{n:05d}.jpg" for n in range(3000)]
    parts = [[k for k in keys if k in Shard(i, 7)] for i in range(7)]
    assert sorted(sum(parts, [])) == keys  # every key in exactly one part
    assert min(map(len, parts)) > 3000 / 7 * 0.8  # and the parts are even
    # Split again across 2 launched processes: together they are exactly the shard.
    halves = [[k for k in keys if k in Shard(3, 7, rank, 2)] for rank in range(2)]
    assert sorted(sum(halves, [])) == parts[3] and all(halves)


def test_caption_shards_concatenate_into_the_full_output(tiny_model, tmp_path, read_jsonl):
    from capcli.jobs import CaptionJob, caption_job

    folder = tmp_path / "photos"
    make_images(folder / "a", 5)
    make_images(folder / "b", 3)

    def captions(*paths, stdin=None, **options) -> str:
        out = io.StringIO()
        caption_job(CaptionJob(paths=list(paths), model=tiny_model, **options), stdout=out, stdin=stdin)
        return out.getvalue()

    # The README's Slurm array, 3 tasks: a listing on stdin, one part file per task, then cat.
    listing = "".join(f"{p}\n" for p in sorted(folder.rglob("*.png")))
    for i in range(3):
        captions("-", stdin=io.StringIO(listing), shard=f"{i}/3", format="jsonl",
                 output=tmp_path / f"part-{i}.jsonl", resume=True)
    merged = "".join((tmp_path / f"part-{i}.jsonl").read_text() for i in range(3))
    assert sorted(r["image"] for r in read_jsonl(merged)) == listing.split()  # each image exactly once

    # CSV parts: only part 0 has the header, so concatenation is one CSV.
    full = captions(str(folder), recursive=True, format="csv")
    parts = [captions(str(folder), recursive=True, format="csv", shard=f"{i}/3") for i in range(3)]
    assert "".join(parts).splitlines()[0] == "image,caption"
    assert sorted("".join(parts).splitlines()) == sorted(full.splitlines())

    # The same folder mounted elsewhere (another machine's path) gives the same shards.
    moved = tmp_path / "elsewhere" / "photos"
    moved.parent.mkdir()
    folder.rename(moved)
    again = captions(str(moved), recursive=True, format="csv", shard="1/3")
    assert again == parts[1].replace(str(folder), str(moved))


# The README's commands for one node: torchrun or accelerate launch, then caption ... -o FILE.
LAUNCHERS = {"torchrun": TWO_PROCESSES,
             "accelerate": [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "capcli"]}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launched_caption_processes_merge_into_one_output(launcher, tiny_model, tmp_path, read_jsonl):
    images = make_images(tmp_path / "photos", 7)
    out = tmp_path / "captions.jsonl"
    result = run(LAUNCHERS[launcher], ["caption", str(tmp_path / "photos"), "--model", str(tiny_model), "-f", "jsonl",
                                       "-o", str(out)])
    assert sorted(r["image"] for r in read_jsonl(out.read_text())) == sorted(map(str, images))
    assert "merged 2 parts" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.jsonl", "photos"]  # no parts left over


def test_a_shard_with_no_images_still_writes_its_part(tiny_model, tmp_path):
    from capcli.jobs import CaptionJob, caption_job

    image, = make_images(tmp_path / "photos", 1)
    for i in range(2):  # one image, two shards: one of them is empty
        caption_job(CaptionJob(paths=[str(image)], model=tiny_model, shard=f"{i}/2", format="csv",
                               output=tmp_path / f"part-{i}.csv"))
    parts = [(tmp_path / f"part-{i}.csv").read_text() for i in range(2)]
    assert "".join(parts).splitlines()[0] == "image,caption" and "".join(parts).count(str(image)) == 1


def test_extract_shards_fill_one_cache(shapes_data, tmp_path):
    def extract(cache: Path, *extra: str) -> int:
        result = run(ONE_PROCESS, ["extract", "--data", str(shapes_data), "--out", str(cache), "--encoder",
                                   "tiny-random-cnn", *extra])
        return int(result.stderr.split("encoded ")[1].split()[0])

    shards = [extract(tmp_path / "shared", "--shard", f"{i}/2") for i in range(2)]
    assert all(shards) and sum(shards) == extract(tmp_path / "whole")  # same work, split in two
    assert extract(tmp_path / "shared") == 0  # the two shards left nothing missing

    # No per-host state: another host mounting the cache and the images elsewhere finds every feature.
    (tmp_path / "shared").rename(tmp_path / "mounted")
    shapes_data.rename(tmp_path / "data-elsewhere")
    shapes_data = tmp_path / "data-elsewhere"
    assert extract(tmp_path / "mounted") == 0
