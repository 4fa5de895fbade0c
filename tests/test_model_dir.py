"""Model dirs describe themselves, hold only the mapper, and refuse anything that does not fit."""

import json
import pickle
import shutil

import pytest
from cli_runner import runner
from safetensors.torch import load_file

from capcli.cli import app
from capcli.errors import CapcliError, ModelError
from capcli.model.modeldir import load_checkpoint
from capcli.model.pipeline import Captioner


def copy(model, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(model, target)
    return target


def test_config_names_encoder_lm_and_mapper_and_weights_hold_only_the_mapper(tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["format_version"] == 1
    assert config["encoder_id"] == "tiny-random-cnn@seed0"
    assert config["lm_id"].startswith("dir-sha256:")
    assert (config["mapper"], config["prefix_length"]) == ("mlp", 2)
    names = load_file(tiny_model / "mapper.safetensors").keys()
    assert names and all(not n.startswith(("lm.", "model.")) for n in names)


def test_python_api_captions_images(tiny_model, tmp_path):
    from conftest import make_images

    images = make_images(tmp_path, 2)
    captioner = Captioner.load(tiny_model, device="cpu")
    captions = captioner.caption(images, max_new_tokens=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert captioner.caption(images[:1], beams=2, num_captions=2, max_new_tokens=4)[0].__len__() == 2
    with pytest.raises(CapcliError, match="'beam'"):
        captioner.caption(images, beam=5)  # a misspelt option is refused, not ignored


def test_python_api_captions_a_folder_larger_than_a_batch_streamed_past_a_bad_file(tiny_model, tmp_path):
    from conftest import make_images

    from capcli.errors import InputError

    images = make_images(tmp_path / "photos", 5)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a picture")
    captioner = Captioner.load(tiny_model, device="cpu")
    results = dict(captioner.caption_folder(tmp_path / "photos", batch_size=2, workers=0, max_new_tokens=4))
    assert sorted(results) == sorted([*images, tmp_path / "photos" / "broken.jpg"])
    assert isinstance(results.pop(tmp_path / "photos" / "broken.jpg"), InputError)
    assert results == dict(zip(images, captioner.caption(images, max_new_tokens=4)))


def test_missing_and_corrupt_files_are_named(tiny_model, tmp_path):
    model = copy(tiny_model, tmp_path)
    (model / "mapper.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="mapper.safetensors: not a readable safetensors file"):
        Captioner.load(model)
    (model / "mapper.safetensors").unlink()
    with pytest.raises(ModelError, match="mapper.safetensors: missing"):
        Captioner.load(model)
    (model / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json: cannot read it as JSON"):
        Captioner.load(model)


def test_unknown_format_version_and_wrong_shapes_are_refused(tiny_model, tmp_path):
    model = copy(tiny_model, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ModelError, match="format version 99 is not supported"):
        Captioner.load(model)
    (model / "config.json").write_text(json.dumps({**config, "prefix_length": 3}))
    with pytest.raises(ModelError, match=r"mapper.safetensors: tensor 'net.3.weight' has shape .*expected"):
        Captioner.load(model)


def test_models_of_retired_experiments_are_refused_in_one_line_and_their_empty_keys_are_read(tiny_model, tmp_path):
    from capcli.config import ModelConfig

    config = json.loads((tiny_model / "config.json").read_text())
    old = ModelConfig.from_dict({**config, "num_layers": 2, "num_heads": 8, "retrieval": None})  # as 0.4 wrote it
    assert old.to_dict() == ModelConfig.from_dict(config).to_dict()
    for retired in ({"mapper": "transformer"}, {"retrieval": {"captions": 3}}):
        with pytest.raises(ModelError, match="capcli 0.4") as caught:
            ModelConfig.from_dict({**config, **retired})
        assert "experiments/README.md" in str(caught.value) and "\n" not in str(caught.value)


def test_mismatched_encoder_or_lm_is_refused_naming_both(tiny_model, tmp_path):
    model = copy(tiny_model, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "encoder_id": "tiny-random-cnn@other"}))
    with pytest.raises(ModelError, match="trained with encoder tiny-random-cnn@other, but tiny-random-cnn@seed0"):
        Captioner.load(model)
    (model / "config.json").write_text(json.dumps({**config, "lm_id": "dir-sha256:0000"}))
    with pytest.raises(ModelError, match="trained with language model dir-sha256:0000, but .* gives dir-sha256:"):
        Captioner.load(model)


class Exploit:
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_malicious_pickle_is_refused_without_running(tiny_model, tmp_path):
    model = copy(tiny_model, tmp_path)
    Exploit.marker = tmp_path / "pwned"
    payload = pickle.dumps({"net.0.weight": Exploit()})
    (model / "mapper.safetensors").write_bytes(payload)
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        Captioner.load(model)
    (model / "checkpoint.pt").write_bytes(payload)
    with pytest.raises(ModelError, match="checkpoint.pt: cannot load checkpoint safely"):
        load_checkpoint(model / "checkpoint.pt")
    assert not Exploit.marker.exists()


def test_training_twice_into_one_dir_needs_resume(tiny_model, shapes_data, tiny_lm):
    result = runner.invoke(app, ["train", "--data", str(shapes_data), "--out", str(tiny_model), "--lm", str(tiny_lm),
                                 "--encoder", "tiny-random-cnn"])
    assert result.exit_code == 2
    assert "already holds a training run: pass --resume" in result.stderr


def test_shipped_models_are_found_by_name_unless_a_folder_has_that_name(tmp_path, monkeypatch):
    from pathlib import Path

    from capcli.model.modeldir import resolve_model_dir

    weights = Path(__file__).resolve().parents[1] / "weights"
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir(None) == resolve_model_dir("default") == weights / "default"
    (tmp_path / "default").mkdir()
    assert resolve_model_dir("default") == Path("default")  # a folder of that name wins
