"""The feature cache stays consistent when extraction is interrupted or shared by two processes."""

import subprocess
import sys

from cli_runner import runner

import capcli.data.features
from capcli.cli import app
from capcli.data.features import FeatureCache


def distinct_images(data):
    return len({p.read_bytes() for p in (data / "images").iterdir()})


def test_interrupted_extract_keeps_finished_shards_and_fills_in_the_rest(shapes_data, tmp_path, monkeypatch):
    monkeypatch.setattr(capcli.data.features, "SHARD_SIZE", 8)
    real_batches = capcli.data.features.image_batches

    def interrupted_after_three_batches(*args, **kwargs):
        for n, batch in enumerate(real_batches(*args, **kwargs)):
            if n == 3:
                raise KeyboardInterrupt  # after one full shard (8 images) and 4 more images in the buffer
            yield batch

    monkeypatch.setattr(capcli.data.features, "image_batches", interrupted_after_three_batches)
    args = ["extract", "--data", str(shapes_data), "--out", str(tmp_path / "f"), "--encoder", "tiny-random-cnn",
            "--batch-size", "4", "--workers", "0"]
    assert runner.invoke(app, args).exit_code == 130
    monkeypatch.setattr(capcli.data.features, "image_batches", real_batches)
    result = runner.invoke(app, args)
    assert result.exit_code == 0
    assert f"encoded {distinct_images(shapes_data) - 12} images" in result.stderr  # the buffer was kept too


def test_two_extract_processes_can_share_one_cache(shapes_data, tmp_path):
    command = [sys.executable, "-m", "capcli", "extract", "--data", str(shapes_data), "--out", str(tmp_path / "f"),
               "--encoder", "tiny-random-cnn", "--quiet", "--workers", "0"]
    jobs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert [job.wait(timeout=120) for job in jobs] == [0, 0], [job.stderr.read() for job in jobs]
    cache = FeatureCache(tmp_path / "f")
    shas = {cache.digest(p) for p in (shapes_data / "images").iterdir()}
    assert all(cache.has("tiny-random-cnn@seed0", sha) for sha in shas)
    features = cache.load("tiny-random-cnn@seed0", sorted(shas))
    assert features.shape == (len(shas), 32) and features.isfinite().all()
