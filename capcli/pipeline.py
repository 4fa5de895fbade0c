"""The one model definition shared by `train` and `caption`: encoder -> prefix mapper -> frozen LM.

ClipCap declared its model twice (training and prediction) and the copies disagreed; here `CaptionModel`
builds the LM inputs, computes the loss and generates, and both commands use it.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from capcli.config import GenerationSettings, ModelConfig
from capcli.devices import autocast, resolve_device
from capcli.encoders import CPU_BATCH, ImageEncoder, load_encoder
from capcli.errors import ImageError, ModelError
from capcli.lm import LanguageModel, load_lm
from capcli.mapper import build_mapper

IGNORE_INDEX = -100  # label of positions that carry no loss: prefix, prompt, padding
MAPPER_FILE = "mapper.safetensors"
CONFIG_FILE = "config.json"


class CaptionModel(nn.Module):
    """The trainable mapper plus the frozen LM (kept out of the state dict that is saved)."""

    def __init__(self, config: ModelConfig, lm: LanguageModel):
        super().__init__()
        self.config = config
        self.mapper = build_mapper(config)
        self.lm = lm  # a plain attribute: never part of mapper_state()
        self.set_prompt(config.prompt)

    def set_prompt(self, prompt: str) -> None:
        """The text placed between the prefix and the caption."""
        self.prompt_ids = self.lm.tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []

    def mapper_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.mapper.state_dict().items()}

    @property
    def device(self) -> torch.device:
        return next(self.mapper.parameters()).device

    def to(self, device):  # move the frozen LM too
        self.lm.model.to(device)
        return super().to(device)

    def tokenize(self, captions: list[str], max_tokens: int = 40) -> list[list[int]]:
        """Caption token ids, each ending in the end-of-text token (so the model learns to stop)."""
        lead = " " if self.prompt_ids else ""
        ids = self.lm.tokenizer([lead + c.strip() for c in captions], add_special_tokens=False).input_ids
        return [seq[: max_tokens - 1] + [self.lm.eos_token_id] for seq in ids]

    def prefix_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, D) or (B, N, D) -> prefix plus prompt embeddings (B, P + len(prompt), E)."""
        prefix = self.mapper(features)  # (B, P, E)
        if not self.prompt_ids:
            return prefix
        embed = self.lm.model.get_input_embeddings()
        prompt = embed(torch.tensor(self.prompt_ids, device=prefix.device))  # (Lp, E)
        return torch.cat([prefix, prompt.to(prefix.dtype).expand(prefix.shape[0], -1, -1)], dim=1)

    def forward(self, features: torch.Tensor, caption_ids: list[list[int]], per_tokens: int | None = None):
        """The training loss (what DistributedDataParallel calls): see loss()."""
        return self.loss(features, caption_ids, per_tokens)

    def loss(self, features: torch.Tensor, caption_ids: list[list[int]], per_tokens: int | None = None) -> torch.Tensor:
        """Cross-entropy summed over caption tokens only, divided by per_tokens (default: their number, a mean;
        data-parallel training passes the global batch's count). Logits are computed just where a label
        exists, which skips the vocabulary projection for the prefix, the prompt and the padding."""
        device = features.device
        longest = max(len(ids) for ids in caption_ids)
        pad = self.lm.tokenizer.pad_token_id
        tokens = torch.full((len(caption_ids), longest), pad, dtype=torch.long, device=device)  # (B, T)
        labels = torch.full_like(tokens, IGNORE_INDEX)
        for row, ids in enumerate(caption_ids):
            tokens[row, : len(ids)] = torch.tensor(ids, device=device)
            labels[row, : len(ids)] = tokens[row, : len(ids)]
        context = self.prefix_embeddings(features)  # (B, C, E)
        words = self.lm.model.get_input_embeddings()(tokens)  # (B, T, E)
        embeds = torch.cat([context, words.to(context.dtype)], dim=1)  # (B, C + T, E)
        mask = torch.cat([torch.ones(context.shape[:2], dtype=torch.long, device=device),
                          (labels != IGNORE_INDEX).long()], dim=1)
        hidden = self.lm.model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        start = context.shape[1] - 1  # the hidden state at position i predicts token i + 1
        predicting = hidden[:, start: start + longest]  # (B, T, E)
        keep = labels != IGNORE_INDEX
        logits = self.lm.model.get_output_embeddings()(predicting[keep])  # (M, V), M caption tokens
        total = nn.functional.cross_entropy(logits.float(), labels[keep], reduction="sum")
        return total / (per_tokens or int(keep.sum()))

    @torch.inference_mode()
    def generate(self, features: torch.Tensor, settings: GenerationSettings) -> list[list[str]]:
        """Batched decoding with a KV cache (transformers' generate): K captions for each of B images."""
        from transformers import GenerationConfig

        embeds = self.prefix_embeddings(features)  # (B, C, E); one length for all, so no padding
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        tok = self.lm.tokenizer
        config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
            num_beams=settings.beams, do_sample=settings.sample, num_return_sequences=settings.num_captions,
            temperature=settings.temperature if settings.sample else None,
            top_p=settings.top_p if settings.sample else None,
            top_k=settings.top_k if settings.sample else None,
            repetition_penalty=settings.repetition_penalty, no_repeat_ngram_size=settings.no_repeat_ngram_size,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
            use_cache=True,
        )
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        with warnings.catch_warnings():  # "n-gram constraints apply only to new tokens": what we want
            warnings.filterwarnings("ignore", message=".*no_repeat_ngram_size.*")
            out = self.lm.model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config)
        texts = [" ".join(t.split()) for t in tok.batch_decode(out, skip_special_tokens=True)]
        k = settings.num_captions
        return [texts[i * k: (i + 1) * k] for i in range(features.shape[0])]


def read_model_dir(model_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """config.json and the mapper weights, loaded safely (safetensors: no code runs)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: model dir not found (train one with `capcli train --out DIR`)")
    config = ModelConfig.load(model_dir / CONFIG_FILE)
    weights = model_dir / MAPPER_FILE
    if not weights.is_file():
        raise ModelError(f"{weights}: missing; a model dir needs {MAPPER_FILE} (written by `capcli train`)")
    try:
        return config, load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights}: not a readable safetensors file ({exc})") from None


def load_mapper_weights(model: CaptionModel, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = model.mapper.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise ModelError(f"{source}: tensor {name!r} missing (expected shape {tuple(tensor.shape)})")
        if state[name].shape != tensor.shape:
            raise ModelError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, expected "
                             f"{tuple(tensor.shape)} for the {model.config.mapper} mapper in config.json")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ModelError(f"{source}: unexpected tensor {unexpected[0]!r} for the {model.config.mapper} mapper")
    model.mapper.load_state_dict({k: v.float() for k, v in state.items()})


def check_matches(config: ModelConfig, encoder: ImageEncoder, lm: LanguageModel, model_dir: Path) -> None:
    if encoder.encoder_id != config.encoder_id:
        raise ModelError(f"{model_dir} was trained with encoder {config.encoder_id}, but {encoder.encoder_id} is "
                         f"installed; install the weights it was trained with or retrain")
    if lm.lm_id != config.lm_id:
        raise ModelError(f"{model_dir} was trained with language model {config.lm_id}, but {config.lm!r} gives "
                         f"{lm.lm_id}; install the LM it was trained with or retrain")


def default_model_dir() -> Path:
    """The shipped default model: weights/default in a source checkout, or share/capcli in an install."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "weights" / "default", Path(sys.prefix) / "share" / "capcli" / "weights" / "default"):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise ModelError("no default model is installed yet: pass --model DIR (train one with `capcli train`)")


class Captioner:
    """The Python API: `Captioner.load(model_dir, device="auto").caption(images)`."""

    def __init__(self, model: CaptionModel, encoder: ImageEncoder, device: torch.device, model_dir: Path | None = None):
        self.model, self.encoder, self.device, self.model_dir = model, encoder, device, model_dir
        self.defaults = GenerationSettings().updated(**model.config.generation)

    @classmethod
    def load(cls, model_dir: Path | str | None = None, device: str = "auto",
             encoder_weights: Path | None = None) -> "Captioner":
        model_dir = Path(model_dir) if model_dir else default_model_dir()
        config, state = read_model_dir(model_dir)
        encoder = load_encoder(config.encoder, encoder_weights)
        lm = load_lm(config.lm)
        check_matches(config, encoder, lm, model_dir)
        model = CaptionModel(config, lm)
        load_mapper_weights(model, state, model_dir / MAPPER_FILE)
        torch_device = resolve_device(device)
        model.eval().to(torch_device)
        return cls(model, encoder.to(torch_device), torch_device, model_dir)

    def settings(self, **options) -> GenerationSettings:
        """This model's default decoding settings, overridden by any option that is not None."""
        return self.defaults.updated(**options).validate()

    @torch.inference_mode()
    def caption_tensors(self, images: torch.Tensor, settings: GenerationSettings) -> list[list[str]]:
        """Preprocessed images (B, 3, H, W) -> K captions each."""
        # On a CPU the encoder is fastest in small batches (encoders.CPU_BATCH), and its activations grow
        # with the batch (EfficientNet-Lite0: about 18 MB an image), so it encodes a few images at a time
        # while the LM decodes the whole batch: peak RSS at batch 16 falls by about 150 MB.
        chunk = len(images) if self.device.type == "cuda" else CPU_BATCH
        with autocast(self.device):
            grid = torch.cat([self.encoder(part.to(self.device)) for part in images.split(chunk)])  # (B, N, D)
            features = grid if self.model.config.uses_grid else grid.mean(1)
            return self.model.generate(features.float(), settings)

    def caption(self, images: Iterable, batch_size: int = 16, **options) -> list:
        """Caption PIL images or paths. Returns one caption per image, or a list of K with num_captions=K.
        An unreadable path raises ImageError; use caption_paths to go on past bad files."""
        from PIL import Image

        from capcli.images import open_image

        settings = self.settings(**options)
        pictures = [img if isinstance(img, Image.Image) else open_image(img) for img in images]
        results: list[list[str]] = []
        for start in range(0, len(pictures), batch_size):
            batch = torch.stack([self.encoder.preprocess(p.convert("RGB")) for p in pictures[start: start + batch_size]])
            results.extend(self.caption_tensors(batch, settings))
        return [r[0] for r in results] if settings.num_captions == 1 else results

    def caption_paths(self, paths: list[Path], settings: GenerationSettings, batch_size: int | None = None,
                      workers: int | None = None) -> Iterator[tuple[Path, list[str] | ImageError]]:
        """Yield (path, captions) or (path, ImageError) for each path, in input order, decoding in parallel.

        batch_size defaults to 64 on a GPU and 16 on a CPU (`python benchmarks/sweeps.py caption`, 2 cores: greedy
        8.0 images/s at 16, 6.7-7.0 at 12, 4.9-5.5 at 8; batch 12 would keep the peak RSS under 1.5 GB)."""
        from capcli.images import image_batches

        batch_size = batch_size or (64 if self.device.type == "cuda" else 16)

        for indices, images, failed in image_batches(paths, self.encoder.preprocess, batch_size, workers):
            captions = self.caption_tensors(images, settings) if images is not None else []
            done = {i: c for i, c in zip(indices, captions)}
            done.update({i: ImageError(paths[i], reason) for i, reason in failed})
            for i in sorted(done):
                yield paths[i], done[i]
