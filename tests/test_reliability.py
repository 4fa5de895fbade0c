"""Unattended jobs: a stop signal, a full disk or a second job on the same folder loses no finished work
and leaves no half-written file."""

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runner import runner
from conftest import make_images

import capcli.outputs.output
from capcli.cli import app
from capcli.reporting import interrupts_deferred, sigterm_interrupts

CAPCLI = [sys.executable, "-m", "capcli"]


def wait_for(condition, job: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.poll() is None, "the job ended before it could be interrupted: " + job.stderr.read()[-2000:]


def default_sigint() -> None:
    """Give the job Ctrl-C's default meaning even when the tests run in the background (`cmd &` or nohup),
    where the shell has set SIGINT to ignored, children inherit that, and Python then leaves it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_caption_job_keeps_whole_records_and_resume_finishes_it(stop, tiny_model, tmp_path):
    images = make_images(tmp_path / "photos", 120)
    out = tmp_path / "captions.jsonl"
    command = [*CAPCLI, "caption", str(tmp_path / "photos"), "--model", str(tiny_model), "-f", "jsonl", "-o",
               str(out), "--batch-size", "1", "--workers", "0", "--quiet"]
    job = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    wait_for(lambda: len(lines(out)) >= 3, job)
    job.send_signal(stop)
    assert job.wait(timeout=60) == 130
    first = [json.loads(line) for line in lines(out)]  # every record whole
    assert 3 <= len(first) < len(images)

    subprocess.run([*command, "--resume"], check=True)
    captioned = [json.loads(line)["image"] for line in lines(out)]
    assert sorted(captioned) == sorted(map(str, images))  # each image exactly once


def test_a_stopped_extract_keeps_what_it_encoded(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, which the CLI turns into the same KeyboardInterrupt) during the 4th encoder batch."""
    from capcli.jobs import ExtractJob, extract_job
    from capcli.model.encoders import ImageEncoder

    data = tmp_path / "data"
    images = make_images(data, 20)
    (data / "captions.csv").write_text("image,caption\n" + "".join(f"{p.name},a shape\n" for p in images))
    job = ExtractJob(data=data, out=tmp_path / "features", encoder="tiny-random-cnn", batch_size=2, workers=0)
    real_forward, calls = ImageEncoder.forward, []

    def stop_in_the_fourth_batch(self, batch):
        if batch.shape[0] == 2:  # not the one-image probe run when an encoder is built
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
        return real_forward(self, batch)

    monkeypatch.setattr(ImageEncoder, "forward", stop_in_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        extract_job(job)
    with sqlite3.connect(tmp_path / "features" / "index.sqlite") as db:
        assert db.execute("SELECT count(*) FROM features").fetchone()[0] == 6  # the 3 batches before the stop
    monkeypatch.setattr(ImageEncoder, "forward", real_forward)
    assert extract_job(job).done == len(images) - 6  # only what was missing


def test_two_caption_jobs_writing_sidecars_into_one_folder(tiny_model, tmp_path):
    images = make_images(tmp_path / "photos", 40)
    command = [*CAPCLI, "caption", str(tmp_path / "photos"), "--model", str(tiny_model), "--sidecar", ".txt",
               "--existing", "overwrite", "--batch-size", "2", "--workers", "0", "--quiet"]
    jobs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert [job.wait(timeout=300) for job in jobs] == [0, 0], [job.stderr.read() for job in jobs]
    for image in images:  # each sidecar is one whole caption, and no temporary file is left
        text = image.with_suffix(".txt").read_text()
        assert text.endswith("\n") and text.count("\n") == 1
    assert sorted(p.suffix for p in (tmp_path / "photos").iterdir()) == [".png"] * 40 + [".txt"] * 40


def test_a_full_disk_stops_with_a_clear_error_and_keeps_written_records(tiny_model, tmp_path, monkeypatch):
    images = make_images(tmp_path / "photos", 6)
    # A real ENOSPC from the kernel: /dev/full refuses every write.
    result = runner.invoke(app, ["caption", str(images[0]), "--model", str(tiny_model), "-o", "/dev/full"])
    assert result.exit_code == 2 and "No space left on device" in result.stderr, result.output

    # The disk fills after 3 records: those stay whole; the job stops with one line.
    out = tmp_path / "captions.jsonl"
    real_write, written = capcli.outputs.output.CaptionWriter._write, []

    def disk_fills(self, row):
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(row)
        real_write(self, row)

    monkeypatch.setattr(capcli.outputs.output.CaptionWriter, "_write", disk_fills)
    result = runner.invoke(app, ["caption", str(tmp_path / "photos"), "--model", str(tiny_model), "-f", "jsonl",
                                 "-o", str(out), "--batch-size", "1"])
    assert result.exit_code == 2 and f"cannot write {out} (No space left on device)" in result.stderr
    assert [json.loads(line)["image"] for line in lines(out)] == [str(p) for p in images[:3]]

    # A sidecar that cannot be written completely is not left half-written.
    def no_space(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(capcli.outputs.output.CaptionWriter, "_write", real_write)
    monkeypatch.setattr("os.fsync", lambda fd: no_space(fd, b""))
    result = runner.invoke(app, ["caption", str(images[0]), "--model", str(tiny_model), "--sidecar", ".txt"])
    assert result.exit_code == 2 and "No space left on device" in result.stderr
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == sorted(p.name for p in images)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_during_a_write_that_must_not_stop_halfway_interrupts_after_it(stop):
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    written = []
    try:
        with pytest.raises(KeyboardInterrupt), sigterm_interrupts():
            with interrupts_deferred():
                os.kill(os.getpid(), stop)
                written.append("the last line")
            written.append("after the block")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert written == ["the last line"]
