"""The slow ways capcli is measured against, written the way the reference code does it.

- seed_extract: the original tutorial's feature extraction, one image at a time: PIL load and transform
  inline, the whole classifier run, and a forward hook on its global pooling layer to catch the features.
- naive_caption: ClipCap's reference decoding (generate2 / generate_beam): one image at a time, and for
  every new token the whole sequence (prefix + tokens so far) is run again through the LM, with no KV
  cache and logits for every position.
- per_image_generate: capcli's own model.generate(inputs_embeds=...) (KV cache), but one image at a time.
- timm_efficientnet_lite: EfficientNet-Lite in timm's layers, which capcli's own (capcli.model.lite) replaces.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn

from capcli.config import DecodingSettings, GenerationSettings
from capcli.devices import autocast
from capcli.errors import ModelError
from capcli.model.encoders import lite_state_dict, lite_weights_file
from capcli.text import tidy


@torch.inference_mode()
def seed_extract(paths: list[Path], encoder_name: str, preprocess, device: torch.device) -> torch.Tensor:
    """Pooled features (n, D), one image at a time through the whole classifier, caught by a hook."""
    classifier = timm_efficientnet_lite(encoder_name).eval().to(device)
    caught = {}
    classifier.global_pool.register_forward_hook(lambda module, inputs, output: caught.update(features=output))
    rows = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        with autocast(device):
            classifier(preprocess(image).unsqueeze(0).to(device))
        rows.append(caught["features"].flatten(1).float().cpu())
    return torch.cat(rows)


def _encode_one(captioner, path: Path) -> tuple[torch.Tensor, list[list[str]] | None]:
    """One image's features, and its labels when the model is grounded (as capcli's captioning computes them)."""
    from capcli.steering.grounding import confident

    image = Image.open(path).convert("RGB")
    grid = captioner.encoder(captioner.encoder.preprocess(image).unsqueeze(0).to(captioner.device))
    grounding, labels = captioner.model.config.grounding, None
    if grounding is not None:
        objects = captioner.detector.detect(image) if captioner.detector is not None else None
        labels = [confident(captioner.labeler(captioner.encoder.classify(grid.mean(1)))[0], grounding, objects)]
    return grid.mean(1).float(), labels


@torch.inference_mode()
def per_image_generate(captioner, paths: list[Path], decoding: DecodingSettings) -> list[str]:
    settings = decoding.generation
    generate, longer = captioner.model.generate, _retry_settings(settings)
    with autocast(captioner.device):
        return [tidy(generate(features, settings, labels)[0][0] or generate(features, longer, labels)[0][0])
                for features, labels in (_encode_one(captioner, path) for path in paths)]


def _retry_settings(settings: GenerationSettings) -> GenerationSettings:
    """The settings capcli decodes an empty caption again with (steering.RetryEmpty)."""
    import dataclasses

    from capcli.steering.stages import MIN_RETRY_TOKENS

    least = min(max(settings.min_new_tokens, MIN_RETRY_TOKENS), settings.max_new_tokens)
    return dataclasses.replace(settings, min_new_tokens=least)


@torch.inference_mode()
def naive_caption(captioner, paths: list[Path], decoding: DecodingSettings) -> list[str]:
    """ClipCap's decoding, with capcli's rule that an empty caption is decoded again with the end of text
    forbidden for a few tokens, and its tidied text."""
    settings = decoding.generation
    decode = _naive_greedy if settings.beams == 1 else _naive_beam
    longer = _retry_settings(settings)
    with autocast(captioner.device):
        return [tidy(decode(captioner.model, *encoded, settings) or decode(captioner.model, *encoded, longer))
                for encoded in (_encode_one(captioner, path) for path in paths)]


def _text(model, ids: list[int]) -> str:
    return " ".join(model.lm.tokenizer.decode(ids, skip_special_tokens=True).split())


def _naive_greedy(model, features: torch.Tensor, labels, settings: GenerationSettings) -> str:
    lm, embed, eos = model.lm.model, model.lm.model.get_input_embeddings(), model.lm.tokenizer.eos_token_id
    sequence, _ = model.prefix_embeddings(features, model.context_ids(labels, 1))  # (1, C, E)
    ids: list[int] = []
    for step in range(settings.max_new_tokens):
        logits = lm(inputs_embeds=sequence, use_cache=False).logits[:, -1]  # the whole sequence, every step
        if step < settings.min_new_tokens:
            logits[:, eos] = float("-inf")
        token = int(logits.argmax(-1))
        if token == eos:
            break
        ids.append(token)
        sequence = torch.cat([sequence, embed(torch.tensor([[token]], device=sequence.device))], dim=1)
    return _text(model, ids)


def _naive_beam(model, features: torch.Tensor, labels, settings: GenerationSettings) -> str:
    """ClipCap's generate_beam: keep `beams` sequences, re-run them whole each step, score by the sum of
    log-probabilities divided by the length, stop when every beam has ended."""
    lm, embed, eos = model.lm.model, model.lm.model.get_input_embeddings(), model.lm.tokenizer.eos_token_id
    beams = settings.beams
    sequence, _ = model.prefix_embeddings(features, model.context_ids(labels, 1))  # (1, C, E), grows to (beams, C + t, E)
    scores = torch.zeros(1, device=sequence.device)
    ids = torch.empty(1, 0, dtype=torch.long, device=sequence.device)
    lengths = torch.zeros(1, device=sequence.device)
    ended = torch.zeros(1, dtype=torch.bool, device=sequence.device)
    for step in range(settings.max_new_tokens):
        logprobs = lm(inputs_embeds=sequence, use_cache=False).logits[:, -1].float().log_softmax(-1)  # (b, V)
        if step < settings.min_new_tokens:
            logprobs[:, eos] = float("-inf")
        logprobs[ended] = float("-inf")
        logprobs[ended, eos] = 0.0  # an ended beam only carries on with its score
        lengths_next = lengths + (~ended).float()
        candidates = (scores[:, None] + logprobs) / lengths_next[:, None]
        best = candidates.flatten().topk(beams).indices
        source, token = best // logprobs.shape[1], best % logprobs.shape[1]
        scores = scores[source] + logprobs[source, token]
        lengths = lengths_next[source]
        ended = ended[source] | (token == eos)
        ids = torch.cat([ids[source], token[:, None]], dim=1)
        sequence = torch.cat([sequence[source], embed(token[:, None])], dim=1)
        if ended.all():
            break
    best_beam = int((scores / lengths).argmax())
    return _text(model, [t for t in ids[best_beam].tolist() if t != eos])


def timm_efficientnet_lite(name: str, weights: Path | None = None) -> nn.Module:
    """The same ImageNet classifier in timm's layers (`tf_efficientnet_liteK`, TF "same" padding, batch norms),
    which tests and benchmarks compare capcli's own with (capcli.model.lite). Needs timm (the test extra)."""
    try:
        import timm
    except ImportError:
        raise ModelError("timm is not installed: pip install timm (only needed to compare with its layers)") from None
    model = timm.create_model("tf_" + name.replace("-", "_"), pretrained=False)
    path = Path(weights) if weights else lite_weights_file(name)
    source = [(k, v) for k, v in lite_state_dict(path, name).items() if not k.endswith("num_batches_tracked")]
    if not any(k.startswith("_fc.") for k, _ in source):  # backbone-only weights: no classification head
        model.classifier = nn.Identity()
    # lukemelas names list the same tensors in the same order as timm's: pair them up
    target = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    model.load_state_dict(dict(zip(target, (v for _, v in source), strict=True)), strict=False)
    return model.requires_grad_(False).eval()
