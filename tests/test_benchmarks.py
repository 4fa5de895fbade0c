"""The benchmark's baselines compute what capcli computes, so their speed comparison is fair."""

import sys
from pathlib import Path

import torch
from conftest import make_images

from capcli.data.features import FeatureCache, extract
from capcli.devices import resolve_device
from capcli.model.encoders import load_encoder
from capcli.model.pipeline import Captioner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from baselines import naive_caption, per_image_generate, seed_extract  # noqa: E402

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.png"))


def test_greedy_captions_are_identical_batched_per_image_and_without_a_cache(tiny_model, tmp_path):
    captioner = Captioner.load(tiny_model, device="cpu")
    paths = make_images(tmp_path, 5)
    settings = captioner.settings(beams=1, max_new_tokens=8, no_repeat_ngram_size=0, forbid_absent=False)  # greedy
    batched = [c.captions[0] for _, c in captioner.caption_paths(paths, settings, batch_size=4, workers=0)]
    assert per_image_generate(captioner, paths, settings) == batched
    assert naive_caption(captioner, paths, settings) == batched
    assert len(naive_caption(captioner, paths[:2], captioner.settings(beams=3, max_new_tokens=8))) == 2


def test_the_seed_extraction_loop_gives_capcli_s_pooled_features(tmp_path):
    encoder, device = load_encoder("efficientnet-lite0"), resolve_device("cpu")
    cache = FeatureCache(tmp_path / "cache")
    digests, _, _ = extract(EXAMPLES, encoder, cache, device, batch_size=4, workers=0)
    ours = cache.load(encoder.encoder_id, [digests[p] for p in EXAMPLES])
    seed = seed_extract(EXAMPLES, "efficientnet-lite0", encoder.preprocess, device)
    assert torch.allclose(ours, seed, atol=1e-4)
