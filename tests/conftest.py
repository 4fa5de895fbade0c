"""Shared fixtures: a tiny frozen LM built from a config, generated images, a private cache per test."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220)}
SHAPES = ("circle", "square")
WORDS = ["a", "an", "image", "of", "photo", "picture", "the", "."] + list(COLOURS) + list(SHAPES)


USER_CACHE = os.environ.get("CAPCLI_CACHE")  # where `capcli setup` put the real default LM

# The tests' encoder, `tiny-random-cnn` (tiny_encoder.py), is a capcli plugin: every capcli a test runs, in
# this process or another, finds it.
os.environ["CAPCLI_PLUGINS"] = "tiny_encoder"
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent),
                                                          os.environ.get("PYTHONPATH")]))


@pytest.fixture
def real_cache(monkeypatch):
    """The user's capcli cache, holding the default LM fetched by `capcli setup`. Tests that need the real
    LM skip without it, unless CAPCLI_REQUIRE_REAL=1 (as in CI), where its absence is a failure."""
    from capcli.files import cache_dir
    from capcli.model.lm import SMOLLM2_SHA256, _converted_dir

    if USER_CACHE:
        monkeypatch.setenv("CAPCLI_CACHE", USER_CACHE)
    else:
        monkeypatch.delenv("CAPCLI_CACHE")
    if not _converted_dir(SMOLLM2_SHA256).is_dir() and os.environ.get("CAPCLI_REQUIRE_REAL") != "1":
        pytest.skip(f"the default LM is not set up in {cache_dir()}: run `capcli setup` first")
    return cache_dir()


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own capcli cache, so nothing leaks between tests or into ~/.cache."""
    cache = tmp_path_factory.mktemp("capcli-cache")
    monkeypatch.setenv("CAPCLI_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A two-layer Llama with a word-level tokenizer, saved as a local model folder. It is pretrained to read
    two words and repeat them in a caption ("red circle a red circle ."), as a real LM knows its language and
    can use its context; used frozen, a mapper must learn to put the right content into its prefix."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-lm")
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         eos_token_id=1, pad_token_id=0, bos_token_id=None, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    sentences = [f"{c} {s} a {c} {s} ." for c in COLOURS for s in SHAPES]
    ids = torch.tensor([tokenizer(s).input_ids + [1] for s in sentences])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    predicted = model(input_ids=ids).logits.argmax(-1)[:, 3:5]  # the words repeated after "a"
    assert torch.equal(predicted, ids[:, 4:6]), "the tiny LM did not learn to repeat its context"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def draw_shape(path: Path, colour: str, shape: str, rng: random.Random, size: int = 48) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    r = size // 3  # one size, so shape shows in pooled features too (a square covers more than a circle)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    img.save(path)


@pytest.fixture
def shapes_data(tmp_path) -> Path:
    """A learnable data set: coloured shapes with captions, as a Flickr8k-style captions.txt + splits."""
    rng = random.Random(0)
    folder = tmp_path / "shapes"
    (folder / "images").mkdir(parents=True)
    rows, train, dev = ["image,caption"], [], []
    for n in range(48):
        colour, shape = list(COLOURS)[n % 3], SHAPES[(n // 3) % 2]
        name = f"img{n:03d}.png"
        draw_shape(folder / "images" / name, colour, shape, rng)
        rows.append(f'{name},"a {colour} {shape} ."')
        (dev if n >= 42 else train).append(name)
    (folder / "captions.txt").write_text("\n".join(rows) + "\n")
    (folder / "train.txt").write_text("\n".join(train) + "\n")
    (folder / "dev.txt").write_text("\n".join(dev) + "\n")
    return folder


def expected_caption(name: str) -> str:
    """The caption of a shapes_data image, as capcli writes it (trained on "a red circle .")."""
    n = int(name[3:6])
    return f"A {list(COLOURS)[n % 3]} {SHAPES[(n // 3) % 2]}."


@pytest.fixture
def read_jsonl():
    def read(text: str) -> list[dict]:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return read


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Eight coloured shapes with captions (captions.txt), and a feature cache beside them."""
    rng = random.Random(1)
    data = tmp_path_factory.mktemp("tiny-data")
    rows = ["image,caption"]
    for n in range(8):
        colour, shape = list(COLOURS)[n % 3], SHAPES[n % 2]
        draw_shape(data / f"{n}.png", colour, shape, rng)
        rows.append(f"{n}.png,a {colour} {shape} .")
    (data / "captions.txt").write_text("\n".join(rows) + "\n")
    return data


def train_tiny(data: Path, lm: Path, out: Path, *extra: str, exit_code: int = 0) -> Path:
    """A quickly trained tiny model dir (its captions need not be right); exit_code: what the run must end with."""
    from cli_runner import runner

    from capcli.cli import app

    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(out), "--encoder", "tiny-random-cnn",
                                 "--lm", str(lm), "--features", str(data / "features"), "--prefix-length", "2",
                                 "--hidden-size", "16", "--epochs", "1", "--batch-size", "4", "--quiet", *extra])
    assert result.exit_code == exit_code, result.output
    return out


def tune(data: Path, model: Path, out: Path, *extra: str):
    """`capcli train --objective cider` of a model dir on the data (and its feature cache); the CLI's result."""
    from cli_runner import runner

    from capcli.cli import app

    return runner.invoke(app, ["train", "--data", str(data), "--out", str(out), "--init", str(model),
                               "--objective", "cider", "--features", str(data / "features"), "--quiet", *extra])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_data, tiny_lm) -> Path:
    """A tiny model dir shared by the caption tests."""
    return train_tiny(tiny_data, tiny_lm, tmp_path_factory.mktemp("tiny-model") / "model")


def make_images(folder: Path, count: int = 3) -> list[Path]:
    rng = random.Random(2)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        path = folder / f"shape{n}.png"
        draw_shape(path, list(COLOURS)[n % 3], SHAPES[n % 2], rng)
        paths.append(path)
    return paths


class ColourDetector:
    """A tiny stand-in for the COCO detector: the bounding box of the non-white pixels, labelled by their
    colour (red: apple, green: broccoli, blue: cup). Picklable, as the real one, for decoding workers."""

    detector_id = "colour-detector@test"
    LABELS = {"red": "apple", "green": "broccoli", "blue": "cup"}

    def detect(self, image):
        import numpy as np

        from capcli.steering.detector import Detection

        pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
        ys, xs = np.nonzero((pixels < 200).any(-1))
        if len(xs) == 0:
            return []
        mean = pixels[ys, xs].mean(0)
        colour = min(COLOURS, key=lambda c: sum((m - v) ** 2 for m, v in zip(mean, COLOURS[c])))
        h, w = pixels.shape[:2]
        box = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
        return [Detection(self.LABELS[colour], 0.9, tuple(round(float(v), 4) for v in box))]


@pytest.fixture(autouse=True)
def colour_detector(request, monkeypatch):
    """The colour stand-in in place of the default detector (`--objects`, `--labels`, models that read objects),
    except in the tests marked real, which use the real detector that `capcli setup` fetched."""
    from capcli.steering import detector
    if request.node.get_closest_marker("real") is None:
        monkeypatch.setitem(detector.DETECTORS, detector.DEFAULT_DETECTOR, lambda log: ColourDetector())
    return ColourDetector()
