"""The one model definition shared by `train` and `caption`: encoder -> prefix mapper -> frozen LM.

ClipCap declared its model twice (training and prediction) and the copies disagreed; here `CaptionModel`
builds the LM inputs, computes the loss and generates, and both commands use it.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from capcli.config import DecodingSettings, GenerationSettings, ModelConfig
from capcli.devices import CPU_BATCH, autocast, resolve_device
from capcli.errors import InputError, ModelError
from capcli.model import modeldir
from capcli.model.encoders import ImageEncoder
from capcli.model.lm import LanguageModel
from capcli.model.mapper import build_mapper
from capcli.steering.detector import DEFAULT_DETECTOR, Detection, load_detector
from capcli.steering.labels import Labeler
from capcli.steering.stages import STAGES, ImageFacts
from capcli.text import tidy

IGNORE_INDEX = -100  # label of positions that carry no loss: prefix, prompt, padding


class CaptionModel(nn.Module):
    """The trainable mapper plus the frozen LM (kept out of the state dict that is saved)."""

    def __init__(self, config: ModelConfig, lm: LanguageModel):
        super().__init__()
        self.config = config
        self.mapper = build_mapper(config)
        self.lm = lm  # a plain attribute: never part of mapper_state()
        self.set_prompt(config.prompt)

    def set_prompt(self, prompt: str) -> None:
        """The text placed between the prefix and the caption (before the labels of a grounded model)."""
        self.prompt_ids = self.lm.tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []

    def mapper_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.mapper.state_dict().items()}

    @property
    def device(self) -> torch.device:
        return next(self.mapper.parameters()).device

    def to(self, device):  # move the frozen LM too
        self.lm.model.to(device)
        return super().to(device)

    @property
    def has_context(self) -> bool:
        """True when text follows the prefix (a prompt, or labels): captions then start with a space."""
        return bool(self.prompt_ids) or self.config.grounding is not None

    def tokenize(self, captions: list[str], max_tokens: int = 40) -> list[list[int]]:
        """Caption token ids, each ending in the end-of-text token (so the model learns to stop)."""
        lead = " " if self.has_context else ""
        ids = self.lm.tokenizer([lead + c.strip() for c in captions], add_special_tokens=False).input_ids
        return [seq[: max_tokens - 1] + [self.lm.eos_token_id] for seq in ids]

    def context_ids(self, labels: list[list[str]] | None, rows: int) -> list[list[int]]:
        """Per row, the token ids between the prefix and the caption: the prompt, then the grounding text."""
        if self.config.grounding is None:
            return [self.prompt_ids] * rows
        texts = [self.config.grounding.text(row) for row in (labels or [[]] * rows)]
        return [self.prompt_ids + ids for ids in self.lm.tokenizer(texts, add_special_tokens=False).input_ids]

    def forward(self, features: torch.Tensor, caption_ids: list[list[int]], divisor: float | None = None,
                context: list[list[int]] | None = None, weights: torch.Tensor | None = None):
        """The training loss (what DistributedDataParallel calls): see loss()."""
        return self.loss(features, caption_ids, divisor, context, weights)

    def loss(self, features: torch.Tensor, caption_ids: list[list[int]], divisor: float | None = None,
             context: list[list[int]] | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy summed over caption tokens only, divided by `divisor` (default: their number, a mean;
        data-parallel training passes the global batch's count). With `weights` (B,), each row's tokens count
        weight times: self-critical training's advantage-weighted log-likelihood. Each row reads its prefix,
        context ids (default: the prompt), caption. Logits are computed just where a label exists, which skips
        the vocabulary projection for all but the caption."""
        device = features.device
        context = context if context is not None else [self.prompt_ids] * len(caption_ids)
        rows = [c + ids for c, ids in zip(context, caption_ids)]
        longest = max(len(r) for r in rows)
        pad = self.lm.tokenizer.pad_token_id
        tokens = torch.full((len(rows), longest), pad, dtype=torch.long, device=device)  # (B, T)
        labels = torch.full_like(tokens, IGNORE_INDEX)
        present = torch.zeros_like(tokens)
        for row, (c, ids) in enumerate(zip(context, caption_ids)):
            tokens[row, : len(c) + len(ids)] = torch.tensor(c + ids, device=device)
            labels[row, len(c): len(c) + len(ids)] = torch.tensor(ids, device=device)
            present[row, : len(c) + len(ids)] = 1
        prefix = self.mapper(features)  # (B, P, E)
        words = self.lm.model.get_input_embeddings()(tokens)  # (B, T, E)
        embeds = torch.cat([prefix, words.to(prefix.dtype)], dim=1)  # (B, P + T, E)
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long, device=device), present], dim=1)
        hidden = self.lm.model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        start = prefix.shape[1] - 1  # the hidden state at position i predicts token i + 1
        predicting = hidden[:, start: start + longest]  # (B, T, E)
        keep = labels != IGNORE_INDEX
        logits = self.lm.model.get_output_embeddings()(predicting[keep])  # (M, V), M caption tokens
        per_token = nn.functional.cross_entropy(logits.float(), labels[keep], reduction="none")  # (M,)
        if weights is not None:
            row_of_token = torch.arange(len(rows), device=device)[:, None].expand_as(labels)[keep]
            per_token = per_token * weights.to(device)[row_of_token]
        return per_token.sum() / (divisor or int(keep.sum()))

    @torch.no_grad()
    def sample_ids(self, features: torch.Tensor, context: list[list[int]], samples: int,
                   max_new_tokens: int) -> list[list[int]]:
        """`samples` captions per image drawn from the model's own distribution (temperature 1, no top-k or
        top-p), as token ids ending with the end-of-text token when they ended; images major, samples minor."""
        settings = GenerationSettings(sample=True, num_captions=samples, max_new_tokens=max_new_tokens)
        eos = self.lm.tokenizer.eos_token_id
        return [row[: row.index(eos) + 1] if eos in row else row
                for row in self._generate(features, context, settings).tolist()]

    def texts(self, ids) -> list[str]:
        """Token id rows as caption text, spaces collapsed."""
        return [" ".join(t.split()) for t in self.lm.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def prefix_embeddings(self, features: torch.Tensor,
                          context: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """pooled features (B, D) and per-row context ids -> (embeddings (B, C, E), attention mask (B, C)),
        padded on the left where the rows differ in length (so every row ends where decoding starts)."""
        prefix = self.mapper(features)  # (B, P, E)
        embed = self.lm.model.get_input_embeddings()
        longest = max(len(c) for c in context)
        rows, masks = [], []
        for row, ids in enumerate(context):
            pad = longest - len(ids)
            parts = [prefix.new_zeros(pad, prefix.shape[2]), prefix[row]]
            if ids:
                parts.append(embed(torch.tensor(ids, device=prefix.device)).to(prefix.dtype))  # (Lc, E)
            rows.append(torch.cat(parts))
            masks.append(torch.tensor([0] * pad + [1] * (prefix.shape[1] + len(ids)), device=prefix.device))
        return torch.stack(rows), torch.stack(masks)

    @torch.inference_mode()
    def generate(self, features: torch.Tensor, settings: GenerationSettings, labels: list[list[str]] | None = None,
                 processors: list | None = None) -> list[list[str]]:
        """Batched decoding with a KV cache (transformers' generate): K captions for each of B images. A
        grounded model names `labels` (per image) in its prompt; `processors` are logits processors (steering's
        stages make them). A caption may come out empty (the captioner's RetryEmpty stage decodes it again)."""
        texts = self.texts(self._generate(features, self.context_ids(labels, features.shape[0]), settings,
                                          processors))
        k = settings.num_captions
        return [texts[i * k: (i + 1) * k] for i in range(features.shape[0])]

    def word_tokens(self, words: list[str]) -> list[list[int]]:
        """Each word's token ids as it follows a space inside a caption, lower case and capitalized."""
        spelled = dict.fromkeys(" " + form for w in words for form in (w, w[:1].upper() + w[1:]))
        return self.lm.tokenizer(list(spelled), add_special_tokens=False).input_ids

    def _generate(self, features: torch.Tensor, context: list[list[int]], settings: GenerationSettings,
                  processors: list | None = None) -> torch.Tensor:
        """transformers' generate with a KV cache from the prefix and context: (B * num_captions, new tokens)."""
        from transformers import GenerationConfig

        embeds, mask = self.prefix_embeddings(features, context)  # (B, C, E)
        tok = self.lm.tokenizer
        config = GenerationConfig(**settings.generate_kwargs(), eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, bos_token_id=None, use_cache=True)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        with warnings.catch_warnings():  # "n-gram constraints apply only to new tokens": what we want
            warnings.filterwarnings("ignore", message=".*no_repeat_ngram_size.*")
            return self.lm.model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config,
                                          logits_processor=processors or None)


@dataclasses.dataclass
class Captioned:
    """One image's captions, and the nouns its encoder's classifier sees (with labels or a grounded model)."""

    captions: list[str]
    labels: list[tuple[str, float]] | None = None
    neighbours: list | None = None  # with a memory: the similar images whose captions voted (memory.Neighbour)
    objects: list[Detection] | None = None  # with a detector: what it found (capcli.steering.detector.Detection)


class Captioner:
    """The Python API: `Captioner.load(model_dir, device="auto").caption(images)`."""

    def __init__(self, model: CaptionModel, encoder: ImageEncoder, device: torch.device, model_dir: Path | None = None,
                 precision: str = "auto", detector=None):
        self.model, self.encoder, self.device, self.model_dir = model, encoder, device, model_dir
        self.detector = detector  # capcli.steering.detector: each image's objects, for the prompt, bans and outputs
        self.precision = precision  # autocast while captioning: see devices.autocast
        self.defaults = DecodingSettings().updated(**model.config.generation)
        self.labeler = Labeler()
        self.stages = [stage() for stage in STAGES]  # steering, run in this order (capcli.steering.stages)
        self.memory = None  # capcli.steering.memory.Memory: similar images' captions pick among candidates
        own = model_dir / modeldir.MEMORY_DIR if model_dir is not None else None
        if own is not None and own.is_dir():
            self.use_memories([own])

    @classmethod
    def load(cls, model_dir: Path | str | None = None, device: str = "auto",
             encoder_weights: Path | None = None, log=None, precision: str = "auto",
             objects: bool = False) -> "Captioner":
        """Load a model dir, or a shipped model by name ("default", used when none is given). encoder_weights:
        the encoder's weights file, for a model trained with one that is no longer where config.json says.
        precision: `auto` (bf16 autocast on CUDA, fp32 elsewhere), `fp32`, or `bf16` (see devices.autocast).
        objects: run the object detector (the model's, else the default) for outputs or --forbid-absent, even
        if the model does not read objects; a model that does, or forbids absent objects by default, always
        runs it."""
        parts = modeldir.load_model(model_dir, encoder_weights=encoder_weights, log=log)
        torch_device = resolve_device(device)
        model, config = parts.caption_model(torch_device), parts.config
        detector = None
        if config.detector or objects or config.generation.get("forbid_absent"):
            detector = load_detector(config.detector or DEFAULT_DETECTOR, log=log)
        return cls(model, parts.encoder.to(torch_device), torch_device, parts.model_dir, precision, detector)

    def use_memories(self, folders: list[Path], mode: str = "replace") -> None:
        """Caption with these memory dirs: instead of the model's own memory (`replace`) or with it (`add`)."""
        from capcli.steering.memory import Memory

        memories = [Memory.load(Path(f)) for f in folders]
        for memory in memories:
            memory.check_encoder(self.encoder.encoder_id, f"model {self.model_dir}")
        if mode == "add" and self.memory is not None:
            memories.insert(0, self.memory)
        self.memory = Memory.combine(memories) if memories else None

    def settings(self, **options) -> DecodingSettings:
        """This model's default decoding settings, overridden by any option that is not None (the fields of
        GenerationSettings and SteeringSettings, by name)."""
        return self.defaults.updated(**options).validate()

    @torch.inference_mode()
    def caption_tensors(self, images: torch.Tensor, settings: DecodingSettings, with_labels: bool = False,
                        objects: list[list[Detection]] | None = None) -> list[Captioned]:
        """Preprocessed images (B, 3, H, W) -> K captions each (and labels, if asked for or grounded). `objects`:
        each image's detections, which a model with a detector needs (caption_paths finds them)."""
        if self.detector is not None and objects is None:
            raise ModelError(f"{self.model_dir or 'this model'} reads each image's objects: caption paths or PIL "
                             f"images (caption_paths, caption), which run the object detector")
        # On a CPU the encoder is fastest in small batches (devices.CPU_BATCH) and its activations grow with
        # the batch, so it encodes a few images at a time while the LM decodes the whole batch.
        chunk = len(images) if self.device.type == "cuda" else CPU_BATCH
        with autocast(self.device, self.precision):
            grid = torch.cat([self.encoder(part.to(self.device)) for part in images.split(chunk)])  # (B, N, D)
            pooled = grid.mean(1)  # (B, D)
            named_objects = with_labels or self.model.config.grounding is not None  # these need the head
            labels = self.labeler(self.encoder.classify(pooled)) if named_objects else None
            facts = [ImageFacts(pooled[i], labels[i] if labels else None, objects[i] if objects is not None else None)
                     for i in range(len(pooled))]
            captions = self._steered(facts, settings)
        return [Captioned([tidy(t) for t in c], image.labels if with_labels else None, image.neighbours,
                          image.objects if with_labels else None)
                for c, image in zip(captions, facts)]

    def _steered(self, facts: list[ImageFacts], settings: DecodingSettings) -> list[list[str]]:
        """Each image's captions, decoded and revised by the steering stages, in order."""
        for stage in self.stages:
            stage.prepare(self, facts, settings)
        decoding = settings
        for stage in self.stages:
            decoding = stage.widen(self, decoding)
        captions = self._decode(facts, decoding)
        for stage in self.stages:
            captions = stage.revise(self, facts, captions, decoding, settings, self._decode)
        return captions

    def _decode(self, facts: list[ImageFacts], settings: DecodingSettings) -> list[list[str]]:
        features = torch.stack([image.pooled for image in facts]).float()
        told = [image.told for image in facts] if self.model.config.grounding is not None else None
        processors = [p for stage in self.stages for p in stage.processors(self, facts, settings)]
        return self.model.generate(features, settings.generation, told, processors)

    def caption(self, images: Iterable, batch_size: int = 16, **options) -> list:
        """Caption PIL images or paths. Returns one caption per image, or a list of K with num_captions=K.
        An unreadable path raises InputError; use caption_paths to go on past bad files."""
        settings = self.settings(**options)
        results = [r.captions for r in self._caption_images(images, settings, batch_size, with_labels=False)]
        return [r[0] for r in results] if settings.generation.num_captions == 1 else results

    def describe(self, images: Iterable, batch_size: int = 16, **options) -> list[Captioned]:
        """caption(), with the nouns the encoder sees: [Captioned(captions, labels)]."""
        return self._caption_images(images, self.settings(**options), batch_size, with_labels=True)

    def _caption_images(self, images: Iterable, settings: DecodingSettings, batch_size: int,
                        with_labels: bool) -> list[Captioned]:
        from itertools import islice

        from PIL import Image

        from capcli.data.images import open_image

        def picture(img):
            return img.convert("RGB") if isinstance(img, Image.Image) else open_image(img)

        results: list[Captioned] = []
        remaining = iter(images)
        while part := [picture(img) for img in islice(remaining, batch_size)]:  # one batch open at a time
            objects = [self.detector.detect(p) for p in part] if self.detector is not None else None
            batch = torch.stack([self.encoder.preprocess(p) for p in part])
            results.extend(self.caption_tensors(batch, settings, with_labels, objects))
        return results

    def caption_folder(self, inputs: str | Path | list, recursive: bool = False, batch_size: int | None = None,
                       workers: int | None = None, **options) -> Iterator[tuple[Path, list | str | InputError]]:
        """Yield (path, caption) for every image of a folder (or of several folders, files and globs), as
        `capcli caption` finds and decodes them: streamed, a batch at a time, decoded in parallel. An image
        that cannot be read yields (path, InputError) and the rest go on. With num_captions=K, K captions."""
        from capcli.data.images import find_images

        paths = [path for path, _ in find_images([str(p) for p in (inputs if isinstance(inputs, list) else [inputs])],
                                                 recursive)]
        settings = self.settings(**options)
        for path, result in self.caption_paths(paths, settings, batch_size, workers):
            if isinstance(result, InputError):
                yield path, result
            else:
                yield path, result.captions[0] if settings.generation.num_captions == 1 else result.captions

    def caption_paths(self, paths: list[Path], settings: DecodingSettings, batch_size: int | None = None,
                      workers: int | None = None, with_labels: bool = False) -> Iterator[tuple[Path, Captioned | InputError]]:
        """Yield (path, Captioned) or (path, InputError) for each path, in input order, decoding in parallel.
        batch_size defaults to 64 on a GPU and 16 on a CPU (`python benchmarks/sweeps.py caption`)."""
        from capcli.data.images import image_batches

        batch_size = batch_size or (64 if self.device.type == "cuda" else 16)
        for indices, images, failed, objects in image_batches(paths, self.encoder.preprocess, batch_size, workers,
                                                              self.detector):
            results = self.caption_tensors(images, settings, with_labels, objects) if images is not None else []
            done = {i: c for i, c in zip(indices, results)}
            done.update(dict(failed))
            for i in sorted(done):
                yield paths[i], done[i]
