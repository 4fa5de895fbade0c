"""Training is resumable: an interrupted run continued with --resume ends where an uninterrupted one does."""

import json

import torch
from cli_runner import runner
from safetensors.torch import load_file

from capcli.cli import app
from capcli.model.pipeline import CaptionModel


def train(data, lm, out, *extra):
    return runner.invoke(app, ["train", "--data", str(data), "--split", str(data / "train.txt"), "--val-split",
                               str(data / "dev.txt"), "--out", str(out), "--encoder", "tiny-random-cnn", "--lm", str(lm),
                               "--prefix-length", "2", "--hidden-size", "16", "--epochs", "3", "--batch-size", "12",
                               "--warmup-steps", "2", "--features", str(data / "features"), "--quiet", *extra])


def last_val_loss(model):
    records = [json.loads(line) for line in (model / "train_log.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in records if "val_loss" in r][-1]


def test_interrupted_training_resumes_to_the_same_result(shapes_data, tiny_lm, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert train(shapes_data, tiny_lm, straight).exit_code == 0

    calls = {"n": 0}
    real_loss = CaptionModel.loss

    def interrupt_on_sixth_call(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # in epoch 2, after 4 training steps and one validation batch
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(CaptionModel, "loss", interrupt_on_sixth_call)
    result = train(shapes_data, tiny_lm, interrupted)
    assert result.exit_code == 130
    assert torch.load(interrupted / "checkpoint.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(CaptionModel, "loss", real_loss)

    result = train(shapes_data, tiny_lm, interrupted, "--resume")
    assert result.exit_code == 0, result.output
    assert abs(last_val_loss(interrupted) - last_val_loss(straight)) < 1e-5
    a, b = load_file(straight / "mapper.safetensors"), load_file(interrupted / "mapper.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_model_with_a_prompt_decodes_as_the_shipped_one_does(shapes_data, tiny_lm, tmp_path):
    model = tmp_path / "model"
    result = train(shapes_data, tiny_lm, model, "--prompt", "a")
    assert result.exit_code == 0, result.output
    config = json.loads((model / "config.json").read_text())
    assert (config["mapper"], config["prompt"]) == ("mlp", "a")
    # A new model decodes as the shipped one does unless told otherwise: beam 3, no repeated 3-grams, no absent things.
    assert config["generation"] == {"beams": 3, "no_repeat_ngram_size": 3, "forbid_absent": True}
    result = runner.invoke(app, ["caption", str(shapes_data / "images" / "img042.png"), "--model", str(model),
                                 "--max-new-tokens", "4", "--quiet"])
    assert result.exit_code == 0, result.output


def test_cache_folder_follows_capcli_cache_then_xdg(monkeypatch, tmp_path):
    from capcli.files import cache_dir

    monkeypatch.setenv("CAPCLI_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("CAPCLI_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "capcli"


def test_sigterm_saves_a_checkpoint_and_exits_130(shapes_data, tiny_lm, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "model"
    command = [sys.executable, "-m", "capcli", "train", "--data", str(shapes_data), "--out", str(out),
               "--encoder", "tiny-random-cnn", "--lm", str(tiny_lm), "--prefix-length", "2", "--hidden-size", "8",
               "--epochs", "10000", "--batch-size", "4", "--features", str(tmp_path / "f"), "--quiet"]
    job = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "train_log.jsonl").exists() and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) == 130, job.stderr.read()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] >= 10
    assert "interrupted" in job.stderr.read()


def test_bf16_autocast_on_the_cpu_trains_close_to_fp32_and_is_recorded(shapes_data, tiny_lm, tmp_path):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert train(shapes_data, tiny_lm, fp32).exit_code == 0
    result = train(shapes_data, tiny_lm, bf16, "--precision", "bf16")
    assert result.exit_code == 0, result.output
    assert json.loads((bf16 / "config.json").read_text())["training"]["precision"] == "bf16"
    # bf16 rounds the matmuls (so not equal), yet learns the same thing (so close)
    assert last_val_loss(bf16) != last_val_loss(fp32)
    assert abs(last_val_loss(bf16) - last_val_loss(fp32)) < 0.05 * last_val_loss(fp32)


def test_resume_refuses_an_option_that_contradicts_the_run_and_prints_its_settings(shapes_data, tiny_lm, tmp_path):
    out = tmp_path / "run"
    assert train(shapes_data, tiny_lm, out, "--max-steps", "2").exit_code == 0
    result = runner.invoke(app, ["train", "--data", str(shapes_data), "--out", str(out), "--resume", "--lr", "0.1"])
    assert result.exit_code == 2
    assert "--lr 0.1 conflicts with the run" in result.stderr and "0.0005" in result.stderr
    result = runner.invoke(app, ["train", "--data", str(shapes_data), "--out", str(out), "--resume", "--max-steps",
                                 "3", "--features", str(shapes_data / "features")])
    assert result.exit_code == 0, result.output
    assert "resuming" in result.stderr and "batch_size=12" in result.stderr and "max_steps=3" in result.stderr
