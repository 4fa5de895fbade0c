"""Grounded models: labels in the prompt, trained on the captions' own nouns; labels in the outputs;
captions never empty; models and encoders that cannot give labels are refused with one line."""

import csv
import io
import json
import random
import shutil

import pytest
import torch
from cli_runner import runner
from conftest import make_images, train_tiny, tune

from capcli.cli import app
from capcli.config import GenerationSettings, GroundingConfig
from capcli.data.images import open_image
from capcli.errors import ModelError
from capcli.model.pipeline import Captioner


@pytest.fixture(scope="module")
def grounded_model(tmp_path_factory, tiny_data, tiny_lm):
    return train_tiny(tiny_data, tiny_lm, tmp_path_factory.mktemp("grounded") / "model", "--grounded")


def test_a_grounded_model_records_its_template_and_captions(grounded_model, tmp_path):
    config = json.loads((grounded_model / "config.json").read_text())
    assert "{labels}" in config["grounding"]["template"] and config["grounding"]["drop"] == 0.4
    images = make_images(tmp_path, 2)
    result = runner.invoke(app, ["caption", *map(str, images), "--model", str(grounded_model), "--max-new-tokens",
                                 "4", "--labels", "-f", "jsonl", "--quiet"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in records] == list(map(str, images))
    for record in records:
        assert record["caption"] and isinstance(record["labels"], list)
        assert all(isinstance(noun, str) and 0 < score <= 1 for noun, score in record["labels"])


def test_labels_go_into_a_csv_column(tiny_model, tmp_path):
    [image] = make_images(tmp_path, 1)
    result = runner.invoke(app, ["caption", str(image), "--model", str(tiny_model), "--labels", "-f", "csv",
                                 "--max-new-tokens", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    header, row = list(csv.reader(io.StringIO(result.stdout)))
    assert header == ["image", "caption", "labels", "objects"] and row[0] == str(image)
    assert all(len(item.split(" ")) >= 2 for item in row[2].split("; ") if item)
    assert row[3] == "apple 0.90"  # the stand-in detector sees the red shape


def test_rows_with_labels_of_different_lengths_decode_as_if_alone(grounded_model):
    captioner = Captioner.load(grounded_model, device="cpu")
    torch.manual_seed(0)
    features = torch.randn(2, captioner.model.config.feature_dim)
    settings = GenerationSettings(max_new_tokens=5)
    alone = captioner.model.generate(features[:1], settings, [["dog"]])
    together = captioner.model.generate(features, settings, [["dog"], ["cat", "ball", "car", "sheep"]])
    assert together[0] == alone[0]


def test_a_caption_is_never_empty(tiny_model, tmp_path):
    """A model whose LM would end the text at once still writes a caption."""
    captioner = Captioner.load(tiny_model, device="cpu")
    head = captioner.model.lm.model.get_output_embeddings()
    with torch.no_grad():
        head.weight[captioner.model.lm.eos_token_id] *= 50  # the end of text now wins every step
    images = make_images(tmp_path, 2)
    settings = captioner.settings(max_new_tokens=6)
    batch = torch.stack([captioner.encoder.preprocess(open_image(p)) for p in images])
    with torch.no_grad():
        features = captioner.encoder(batch).mean(1)
    raw = captioner.model.generate(features, settings.generation)
    assert raw == [[""], [""]]  # what decoding alone gives here; the RetryEmpty stage decodes them again
    assert all(c.strip() for c in captioner.caption(images, max_new_tokens=6))


def headless(monkeypatch):
    """Encoders loaded without their classification head, as backbone-only weights give."""
    import capcli.model.encoders

    real = capcli.model.encoders.load_encoder

    def load(*args, **kwargs):
        encoder = real(*args, **kwargs)
        encoder.head = None
        return encoder
    monkeypatch.setattr(capcli.model.encoders, "load_encoder", load)


def test_labels_without_a_classification_head_stop_with_one_line(tiny_model, tmp_path, monkeypatch):
    [image] = make_images(tmp_path, 1)
    headless(monkeypatch)
    result = runner.invoke(app, ["caption", str(image), "--model", str(tiny_model), "--labels"])
    assert result.exit_code == 2
    assert "no classification head" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_grounded_model_refuses_an_encoder_without_a_head(grounded_model, monkeypatch):
    headless(monkeypatch)
    with pytest.raises(ModelError, match=f"{grounded_model}.*no classification head"):
        Captioner.load(grounded_model, device="cpu")


def test_an_unknown_key_in_config_json_is_refused_naming_it(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config["generation"] = {"beam": 5}  # a typo of "beams"
    (model / "config.json").write_text(json.dumps(config))
    [image] = make_images(tmp_path, 1)
    result = runner.invoke(app, ["caption", str(image), "--model", str(model)])
    assert result.exit_code == 2
    assert "generation.beam" in result.stderr and str(model / "config.json") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_python_api_gives_labels_on_request_and_captions_without_a_head(tiny_model, tmp_path, monkeypatch):
    images = make_images(tmp_path, 2)
    [described, _] = Captioner.load(tiny_model, device="cpu").describe(images, max_new_tokens=3)
    assert described.captions[0] and isinstance(described.labels, list)
    headless(monkeypatch)
    captioner = Captioner.load(tiny_model, device="cpu")
    assert all(captioner.caption(images, max_new_tokens=3))  # an ungrounded model needs no head to caption
    with pytest.raises(ModelError, match="no classification head"):
        captioner.describe(images)


def test_self_critical_tuning_with_caption_labels_names_a_training_caption_s_nouns(grounded_model, tiny_data, tmp_path,
                                                                                 monkeypatch):
    from capcli.model.pipeline import CaptionModel

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    nouns = ["umbrella", "guitar"]
    rows = ["image,caption"] + [f"{n}.png,a {nouns[n % 2]} by a {nouns[(n + 1) % 2]} ." for n in range(8)]
    (data / "captions.txt").write_text("\n".join(rows) + "\n")
    real_context_ids, told = CaptionModel.context_ids, []

    def recording(self, labels, rows):
        told.extend(labels or [])
        return real_context_ids(self, labels, rows)

    monkeypatch.setattr(CaptionModel, "context_ids", recording)
    result = tune(data, grounded_model, tmp_path / "tuned", "--tune-labels", "captions", "--samples", "2",
                  "--batch-size", "4", "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert told and all(set(labels) <= set(nouns) for labels in told)
    assert any(labels for labels in told)  # some of the two nouns survive the drop
    settings = json.loads((tmp_path / "tuned" / "config.json").read_text())["training"]
    assert settings["tune_labels"] == "captions"


def test_mixed_training_labels_tell_the_photos_labels_for_some_captions_and_the_captions_nouns_for_others():
    from types import SimpleNamespace

    from capcli.training.train import _example

    data = SimpleNamespace(pairs=[(0, None)], texts=["A dog runs after a cat ."], labels=[["person", "frisbee"]])
    mix = GroundingConfig(drop=0.0, swap=0.0, train_labels="mix")
    told = {tuple(_example(data, 0, mix, random.Random(seed))[0]) for seed in range(40)}
    assert told == {("person", "frisbee"), ("dog", "cat")}
    assert _example(data, 0, GroundingConfig(drop=0.0, train_labels="machine"), random.Random(0))[0] == ["person", "frisbee"]
