"""The pipeline learns: a tiny mapper trained on coloured shapes writes the right captions."""

from pathlib import Path

from cli_runner import runner
from conftest import expected_caption

from capcli.cli import app


def train_shapes(data: Path, lm: Path, out: Path, *extra: str):
    return runner.invoke(app, [
        "train", "--data", str(data), "--split", str(data / "train.txt"), "--val-split", str(data / "dev.txt"),
        "--out", str(out), "--encoder", "tiny-random-cnn", "--lm", str(lm), "--prefix-length", "2",
        "--hidden-size", "64", "--epochs", "40", "--batch-size", "12", "--lr", "1e-2", "--warmup-steps", "5",
        "--device", "cpu", "--quiet", *extra,
    ])


def test_trained_mapper_captions_unseen_images_correctly(shapes_data, tiny_lm, tmp_path, read_jsonl):
    model = tmp_path / "model"
    result = train_shapes(shapes_data, tiny_lm, model)
    assert result.exit_code == 0, result.output

    dev = [shapes_data / "images" / n for n in (shapes_data / "dev.txt").read_text().split()]
    result = runner.invoke(app, ["caption", *map(str, dev), "--model", str(model), "--format", "jsonl", "--quiet",
                                 "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    records = read_jsonl(result.stdout)
    assert [r["image"] for r in records] == [str(p) for p in dev]
    correct = [r["caption"] == expected_caption(Path(r["image"]).name) for r in records]
    assert all(correct), records

    log = read_jsonl((model / "train_log.jsonl").read_text())
    epochs = [r for r in log if "val_loss" in r]
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"] / 3
