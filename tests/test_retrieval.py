"""Retrieval in the prompt: a model trained with --retrieval reads similar images' captions before its prefix,
keeps its training set as its memory, and refuses to caption without a memory."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from capcli.cli import app
from capcli.config import GenerationSettings, RetrievalConfig
from capcli.memory import Memory
from capcli.pipeline import CaptionModel, Captioner
from conftest import make_images, train_tiny, tune

runner = CliRunner()


@pytest.fixture(scope="module")
def retrieval_model(tmp_path_factory, tiny_data, tiny_lm):
    return train_tiny(tiny_data, tiny_lm, tmp_path_factory.mktemp("retrieval") / "model", "--retrieval")


def test_hints_are_the_neighbours_captions_most_agreed_on_first_and_can_leave_an_image_out():
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0]])
    memory = Memory.from_features("enc", ["a", "b", "c", "d"], [["a red circle ."], ["a red circle on white ."],
                                                                 ["a green square ."], ["a blue sky ."]], features)
    [ranked] = memory.hints(features[:1], neighbours=3, count=2)
    assert sorted(ranked) == ["a red circle .", "a red circle on white ."]  # the green square agrees with neither
    [without_itself] = memory.hints(features[:1], neighbours=2, count=3, exclude=[0])
    assert "a red circle ." not in without_itself and len(without_itself) == 2


def test_the_hints_read_as_one_sentence_each():
    assert RetrievalConfig().text(["a dog runs .", "A dog jumps"]) == "Similar images: a dog runs. A dog jumps."


def test_a_model_trained_with_retrieval_remembers_its_training_set_and_captions_with_it(retrieval_model, tmp_path):
    config = json.loads((retrieval_model / "config.json").read_text())
    assert config["retrieval"]["captions"] == 3 and "{captions}" in config["retrieval"]["template"]
    index = json.loads((retrieval_model / "memory" / "memory.json").read_text())
    assert sorted(index["images"]) == [f"{n}.png" for n in range(8)]
    captioner = Captioner.load(retrieval_model, device="cpu")
    pooled = torch.randn(2, captioner.model.config.feature_dim)
    assert all(len(row) == 3 and set(row) <= {c for cs in index["captions"] for c in cs}
               for row in captioner._hints(pooled))
    own = tmp_path / "own-memory"  # another memory's captions replace the model's own in the prompt
    Memory.from_features(captioner.encoder.encoder_id, ["x.png"], [["a purple star ."]], pooled[:1]).save(own)
    captioner.use_memories([own])
    assert captioner._hints(pooled) == [["a purple star ."], ["a purple star ."]]
    images = make_images(tmp_path, 2)
    result = runner.invoke(app, ["caption", *map(str, images), "--model", str(retrieval_model),
                                 "--max-new-tokens", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2


def test_rows_with_hints_of_different_lengths_decode_and_score_as_if_alone(retrieval_model):
    captioner = Captioner.load(retrieval_model, device="cpu")
    model = captioner.model
    torch.manual_seed(0)
    features = torch.randn(2, model.config.feature_dim)
    hints = [["a red circle ."], ["a green square .", "a blue circle on a white ground .", "a red square ."]]
    settings = GenerationSettings(max_new_tokens=5)
    alone = model.generate(features[:1], settings, None, None, hints[:1])
    together = model.generate(features, settings, None, None, hints)
    assert together[0] == alone[0]
    captions = model.tokenize(["a red circle .", "a green square ."])
    before = model.hint_ids(hints)
    with torch.no_grad():
        both = model.loss(features, captions, 1.0, None, None, before)
        each = sum(model.loss(features[i:i + 1], captions[i:i + 1], 1.0, None, None, before[i:i + 1]) for i in range(2))
        without = model.loss(features, captions, 1.0)
    assert both.item() == pytest.approx(each.item(), rel=1e-4)
    assert both.item() != pytest.approx(without.item(), rel=1e-4)  # the hints are read


def test_a_retrieval_model_without_a_memory_stops_with_one_line(retrieval_model, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(retrieval_model, bare)
    shutil.rmtree(bare / "memory")
    [image] = make_images(tmp_path / "images", 1)
    result = runner.invoke(app, ["caption", str(image), "--model", str(bare), "--max-new-tokens", "3", "--quiet"])
    assert result.exit_code == 2
    assert "needs a memory" in result.output and "--memory" in result.output
    with_memory = runner.invoke(app, ["caption", str(image), "--model", str(bare), "--memory",
                                      str(retrieval_model / "memory"), "--max-new-tokens", "3", "--quiet"])
    assert with_memory.exit_code == 0, with_memory.output


def test_self_critical_tuning_of_a_retrieval_model_samples_with_its_hints(retrieval_model, tiny_data, tmp_path,
                                                                          monkeypatch):
    real_sample_ids, hints_read = CaptionModel.sample_ids, []

    def recording(self, features, context, samples, max_new_tokens, before=None):
        hints_read.append(before)
        return real_sample_ids(self, features, context, samples, max_new_tokens, before)

    monkeypatch.setattr(CaptionModel, "sample_ids", recording)
    result = tune(tiny_data, retrieval_model, tmp_path / "tuned", "--samples", "2", "--batch-size", "4", "--epochs",
                  "1", "--xent-weight", "0.1")
    assert result.exit_code == 0, result.output
    assert len(hints_read) == 2 and all(len(before) == 4 and all(before) for before in hints_read)
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["retrieval"] is not None


def test_a_resumed_retrieval_run_takes_its_ranked_hints_from_the_checkpoint(tiny_data, tiny_lm, tmp_path, monkeypatch):
    model, real_loss, calls = tmp_path / "model", CaptionModel.loss, []

    def interrupt_on_third_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(CaptionModel, "loss", interrupt_on_third_call)
    train_tiny(tiny_data, tiny_lm, model, "--retrieval", "--epochs", "2", exit_code=130)
    monkeypatch.setattr(CaptionModel, "loss", real_loss)

    def rank_again(*args, **kwargs):
        raise AssertionError("the hints were ranked again")

    monkeypatch.setattr(Memory, "hints", rank_again)
    train_tiny(tiny_data, tiny_lm, model, "--retrieval", "--epochs", "2", "--resume")
    assert json.loads((model / "config.json").read_text())["training"]["epochs"] == 2
