"""The real default encoder and language model: load, one training step, one caption. Run in CI."""

import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import runner

from capcli.cli import app

pytestmark = pytest.mark.real
PHOTOS = Path(__import__("skimage").__file__).parent / "data"


@pytest.fixture
def photo_data(tmp_path) -> Path:
    """Two public-domain photos from scikit-image with sidecar captions."""
    shutil.copy(PHOTOS / "chelsea.png", tmp_path / "chelsea.png")
    shutil.copy(PHOTOS / "coffee.png", tmp_path / "coffee.png")
    (tmp_path / "chelsea.txt").write_text("A ginger cat sits on the floor .\n")
    (tmp_path / "coffee.txt").write_text("A cup of coffee on a saucer .\n")
    return tmp_path


def test_default_lm_loads_frozen(real_cache):
    from capcli.model.lm import load_lm

    lm = load_lm()
    assert lm.width == 576 and lm.tokenizer.eos_token_id is not None
    assert not any(p.requires_grad for p in lm.model.parameters()) and not lm.model.training


def test_one_training_step_moves_only_the_mapper(real_cache):
    from capcli.config import ModelConfig
    from capcli.data.images import open_image
    from capcli.model.encoders import load_encoder
    from capcli.model.lm import load_lm
    from capcli.model.pipeline import CaptionModel

    encoder, lm = load_encoder(), load_lm()
    config = ModelConfig(encoder=encoder.name, encoder_id=encoder.encoder_id, feature_dim=encoder.feature_dim,
                         num_tokens=encoder.num_tokens, lm="smollm2-135m", lm_id=lm.lm_id, lm_width=lm.width)
    torch.manual_seed(0)
    model = CaptionModel(config, lm)
    images = torch.stack([encoder.preprocess(open_image(PHOTOS / n)) for n in ("chelsea.png", "coffee.png")])
    with torch.no_grad():
        pooled = encoder(images).mean(1)  # (2, 1280)
    model.mapper.norm.fit(pooled)
    optimizer = torch.optim.AdamW(model.mapper.parameters(), lr=3e-4)
    ids = model.tokenize(["A ginger cat sits on the floor .", "A cup of coffee ."])
    before = model.loss(pooled, ids).item()
    for _ in range(3):
        loss = model.loss(pooled, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is None for p in lm.model.parameters())
    assert model.loss(pooled, ids).item() < before - 0.5


def test_train_and_caption_with_the_real_models(real_cache, photo_data, tmp_path):
    model = tmp_path / "model"
    result = runner.invoke(app, ["train", "--data", str(photo_data), "--out", str(model), "--epochs", "1",
                                 "--batch-size", "2", "--features", str(tmp_path / "features"), "--quiet"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["caption", str(photo_data / "chelsea.png"), "--model", str(model),
                                 "--min-new-tokens", "3", "--max-new-tokens", "8", "--quiet"])
    assert result.exit_code == 0, result.output
    path, text = result.stdout.rstrip("\n").split("\t")
    assert path.endswith("chelsea.png") and len(text.split()) >= 1


def test_the_shipped_default_model_captions_an_example_with_no_flags(real_cache):
    example = Path(__file__).resolve().parents[1] / "examples" / "chelsea.png"
    result = runner.invoke(app, ["caption", str(example), "--quiet"])
    assert result.exit_code == 0, result.output
    path, text = result.stdout.rstrip("\n").split("\t")
    assert path == str(example) and len(text.split()) >= 4 and text.endswith(".")


def test_the_encoder_names_the_example_photos():
    from capcli.data.images import open_image
    from capcli.model.encoders import load_encoder
    from capcli.steering.labels import Labeler

    encoder = load_encoder()
    examples = Path(__file__).resolve().parents[1] / "examples"
    images = torch.stack([encoder.preprocess(open_image(examples / n)) for n in ("chelsea.png", "coffee.png",
                                                                                "rocket.jpg")])
    with torch.no_grad():
        labels = Labeler()(encoder.classify(encoder(images).mean(1)))
    assert [row[0][0] for row in labels] == ["cat", "coffee", "rocket"]


def test_the_default_model_names_the_astronaut_a_person_the_cat_the_coffee_and_the_rocket(real_cache):
    from capcli.steering.labels import nouns_in
    from capcli.steering.objects import objects_in

    examples = Path(__file__).resolve().parents[1] / "examples"
    result = runner.invoke(app, ["caption", str(examples), "--quiet"])
    assert result.exit_code == 0, result.output
    captions = dict(line.split("\t") for line in result.stdout.splitlines())
    astronaut, cat, coffee, rocket = (captions[str(examples / n)] for n in
                                      ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"))
    sports = {"soccer", "football", "tennis", "baseball", "basketball", "field", "ball", "bat", "racket"}
    assert "person" in objects_in(astronaut) and not sports & set(astronaut.lower().rstrip(".").split()), astronaut
    assert "cat" in objects_in(cat) and "dog" not in objects_in(cat), cat
    assert ("cup" in objects_in(coffee) or "coffee" in nouns_in(coffee)) and "dog" not in objects_in(coffee), coffee
    assert "rocket" in nouns_in(rocket), rocket
    assert not any(" ." in c or " ," in c for c in captions.values()), captions
