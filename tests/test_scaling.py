"""Scaling out: data-parallel training under torchrun (2 CPU processes, gloo) takes the same steps as one
process, --resume works across a different number of processes, and --shard splits inputs exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
