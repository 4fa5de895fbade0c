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

from capcli.absent import absent_objects, absent_words, compound_nouns
from capcli import modeldir
from capcli.config import GenerationSettings, ModelConfig
from capcli.detector import DEFAULT_DETECTOR, Detection, load_detector
from capcli.devices import autocast, resolve_device
from capcli.encoders import CPU_BATCH, ImageEncoder, load_encoder
from capcli.errors import InputError, ModelError
from capcli.grounding import confident
from capcli.labels import Labeler
from capcli.lm import LanguageModel, load_lm
from capcli.mapper import build_mapper
from capcli.modeldir import MAPPER_FILE, check_matches, load_mapper_weights, read_model_dir, resolve_model_dir
from capcli.text import tidy

MEMORY_DIR = "memory"  # a model dir's own retrieval memory, if it has one
IGNORE_INDEX = -100  # label of positions that carry no loss: prefix, prompt, padding
MIN_RETRY_TOKENS = 4  # an empty caption is decoded again with at least this many tokens


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
                 bans: WordBans | None = None) -> list[list[str]]:
        """Batched decoding with a KV cache (transformers' generate): K captions for each of B images.
        A grounded model names `labels` (per image) in its prompt; `bans` holds, per image, words the captions
        may not contain. Never returns an
        empty caption: images whose caption came out empty are decoded again with the end of text forbidden for
        a few tokens."""
        context = self.context_ids(labels, features.shape[0])
        captions = self._decode(features, context, settings, bans)
        empty = [i for i, texts in enumerate(captions) if not all(texts)]
        if empty:
            least = min(max(settings.min_new_tokens, MIN_RETRY_TOKENS), settings.max_new_tokens)
            longer = dataclasses.replace(settings, min_new_tokens=least)
            some_bans = bans.rows(empty) if bans else None
            for i, texts in zip(empty, self._decode(features[empty], [context[i] for i in empty], longer,
                                                    some_bans)):
                captions[i] = [old or new for old, new in zip(captions[i], texts)]
        return captions

    def word_tokens(self, words: list[str]) -> list[list[int]]:
        """Each word's token ids as it follows a space inside a caption, lower case and capitalized."""
        spelled = dict.fromkeys(" " + form for w in words for form in (w, w[:1].upper() + w[1:]))
        return self.lm.tokenizer(list(spelled), add_special_tokens=False).input_ids

    def _decode(self, features: torch.Tensor, context: list[list[int]], settings: GenerationSettings,
                bans: WordBans | None = None) -> list[list[str]]:
        texts = self.texts(self._generate(features, context, settings, bans))
        k = settings.num_captions
        return [texts[i * k: (i + 1) * k] for i in range(features.shape[0])]

    def _generate(self, features: torch.Tensor, context: list[list[int]], settings: GenerationSettings,
                  bans: WordBans | None = None) -> torch.Tensor:
        """transformers' generate with a KV cache from the prefix and context: (B * num_captions, new tokens)."""
        from transformers import GenerationConfig

        embeds, mask = self.prefix_embeddings(features, context)  # (B, C, E)
        tok = self.lm.tokenizer
        processors = []
        if bans and any(bans.forbidden):
            processors.append(_ForbiddenWords(bans.forbidden, bans.allowed))
        config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
            num_beams=settings.beams, do_sample=settings.sample, num_return_sequences=settings.num_captions,
            temperature=settings.temperature if settings.sample else None,
            top_p=settings.top_p if settings.sample else None,
            top_k=settings.top_k if settings.sample else None,
            repetition_penalty=settings.repetition_penalty, no_repeat_ngram_size=settings.no_repeat_ngram_size,
            length_penalty=settings.length_penalty if settings.beams > 1 else None,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
            use_cache=True,
        )
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        with warnings.catch_warnings():  # "n-gram constraints apply only to new tokens": what we want
            warnings.filterwarnings("ignore", message=".*no_repeat_ngram_size.*")
            return self.lm.model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config,
                                          logits_processor=processors or None)


@dataclasses.dataclass
class WordBans:
    """Per image, token sequences (words) its captions may not contain, and compound words that stay allowed
    although they end in a forbidden word ("hot dog" where "dog" is forbidden)."""

    forbidden: list[list[list[int]]]
    allowed: list[list[list[int]]]

    def rows(self, images: list[int]) -> "WordBans":
        return WordBans([self.forbidden[i] for i in images], [self.allowed[i] for i in images])


class _ForbiddenWords:
    """A logits processor: per image, token sequences that may not be generated (as transformers'
    `bad_words_ids`, which holds one list for the whole batch): a sequence's last token is forbidden where the
    tokens before it were just generated. `allowed` sequences lift that again for their last token after
    their own first tokens: "hot dog" stays possible where "dog" is forbidden."""

    def __init__(self, forbidden: list[list[list[int]]], allowed: list[list[list[int]]] | None = None):
        self.forbidden = [self._group(sequences) for sequences in forbidden]
        self.allowed = [self._group(sequences) for sequences in (allowed or [[] for _ in forbidden])]

    @staticmethod
    def _group(sequences: list[list[int]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Length of the head (tokens before the last) -> (heads (S, n), last tokens (S,))."""
        by_length: dict[int, list[list[int]]] = {}
        for sequence in sequences:
            by_length.setdefault(len(sequence) - 1, []).append(sequence)
        return {n: (torch.tensor([s[:-1] for s in group], dtype=torch.long).reshape(len(group), n),
                    torch.tensor([s[-1] for s in group], dtype=torch.long)) for n, group in by_length.items()}

    @staticmethod
    def _mark(mask: torch.Tensor, recent: torch.Tensor, groups: dict, value: bool) -> None:
        """Set mask[row, last] = value for each sequence whose head the row's latest tokens match."""
        for n, (heads, lasts) in groups.items():
            lasts = lasts.to(mask.device)
            if n == 0:
                mask[:, lasts] = value
            elif recent.shape[1] >= n:
                hit = (recent[:, -n:][:, None, :] == heads.to(recent.device)[None]).all(-1)  # (R, S)
                rows, which = hit.nonzero(as_tuple=True)
                mask[rows, lasts[which]] = value

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows_per_image = scores.shape[0] // len(self.forbidden)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for image, (forbidden, allowed) in enumerate(zip(self.forbidden, self.allowed)):
            rows = slice(image * rows_per_image, (image + 1) * rows_per_image)
            self._mark(mask[rows], input_ids[rows], forbidden, True)
            self._mark(mask[rows], input_ids[rows], allowed, False)
        return scores.masked_fill(mask, -float("inf"))


@dataclasses.dataclass
class Captioned:
    """One image's captions, and the nouns its encoder's classifier sees (with labels or a grounded model)."""

    captions: list[str]
    labels: list[tuple[str, float]] | None = None
    neighbours: list | None = None  # with a memory: the similar images whose captions voted (memory.Neighbour)
    objects: list[Detection] | None = None  # with a detector: what it found (capcli.detector.Detection)


class Captioner:
    """The Python API: `Captioner.load(model_dir, device="auto").caption(images)`."""

    def __init__(self, model: CaptionModel, encoder: ImageEncoder, device: torch.device, model_dir: Path | None = None,
                 precision: str = "auto", detector=None):
        self.model, self.encoder, self.device, self.model_dir = model, encoder, device, model_dir
        self.detector = detector  # capcli.detector: each image's objects, for the prompt, bans and outputs
        self.precision = precision  # autocast while captioning: see devices.autocast
        self.defaults = GenerationSettings().updated(**model.config.generation)
        self.labeler = Labeler()
        self._word_ids: dict[str, list[list[int]]] = {}  # a word's token ids, lower case and capitalized
        self.memory = None  # capcli.memory.Memory: similar images' captions pick among candidates
        own = model_dir / MEMORY_DIR if model_dir is not None else None
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
        model_dir = resolve_model_dir(model_dir)  # log: hears of a first-use download
        config, state = read_model_dir(model_dir)
        encoder = load_encoder(config.encoder, modeldir.encoder_weights(config, encoder_weights))
        if config.grounding is not None and encoder.head is None:
            raise ModelError(f"{model_dir} names the objects its encoder's classifier sees, but encoder "
                             f"{encoder.encoder_id} has no classification head; use weights that include it")
        lm = load_lm(config.lm, log=log)
        check_matches(config, encoder, lm, model_dir)
        model = CaptionModel(config, lm)
        load_mapper_weights(model.mapper, state, model_dir / MAPPER_FILE, config.mapper)
        torch_device = resolve_device(device)
        model.eval().to(torch_device)
        detector = None
        if config.detector or objects or config.generation.get("forbid_absent"):
            detector = load_detector(config.detector or DEFAULT_DETECTOR, log=log)
        return cls(model, encoder.to(torch_device), torch_device, model_dir, precision, detector)

    def use_memories(self, folders: list[Path], mode: str = "replace") -> None:
        """Caption with these memory dirs: instead of the model's own memory (`replace`) or with it (`add`)."""
        from capcli.memory import Memory

        memories = [Memory.load(Path(f)) for f in folders]
        for memory in memories:
            memory.check_encoder(self.encoder.encoder_id, f"model {self.model_dir}")
        if mode == "add" and self.memory is not None:
            memories.insert(0, self.memory)
        self.memory = Memory.combine(memories) if memories else None

    def settings(self, **options) -> GenerationSettings:
        """This model's default decoding settings, overridden by any option that is not None."""
        return self.defaults.updated(**options).validate()

    @torch.inference_mode()
    def caption_tensors(self, images: torch.Tensor, settings: GenerationSettings, with_labels: bool = False,
                        objects: list[list[Detection]] | None = None) -> list[Captioned]:
        """Preprocessed images (B, 3, H, W) -> K captions each (and labels, if asked for or grounded). `objects`:
        each image's detections, which a model with a detector needs (caption_paths finds them)."""
        if self.detector is not None and objects is None:
            raise ModelError(f"{self.model_dir or 'this model'} reads each image's objects: caption paths or PIL "
                             f"images (caption_paths, caption), which run the object detector")
        # On a CPU the encoder is fastest in small batches (encoders.CPU_BATCH) and its activations grow with
        # the batch, so it encodes a few images at a time while the LM decodes the whole batch.
        chunk = len(images) if self.device.type == "cuda" else CPU_BATCH
        grounding = self.model.config.grounding
        with autocast(self.device, self.precision):
            grid = torch.cat([self.encoder(part.to(self.device)) for part in images.split(chunk)])  # (B, N, D)
            pooled = grid.mean(1)  # (B, D)
            named_objects = with_labels or grounding is not None  # these need the head (classify says so)
            logits = self.encoder.classify(pooled) if named_objects else None
            labels = self.labeler(logits) if named_objects else None
            named = ([confident(row, grounding, objects[i] if objects is not None else None)
                      for i, row in enumerate(labels)] if grounding else None)
            bans = self._bans(settings, objects, named)
            if self.memory is None:
                captions, neighbours = self.model.generate(pooled.float(), settings, named, bans), None
            else:
                captions, neighbours = self._vote(pooled.float(), pooled, settings, named, bans)
        return [Captioned([tidy(t) for t in c], labels[i] if with_labels else None, neighbours[i] if neighbours else None,
                          objects[i] if objects is not None and with_labels else None)
                for i, c in enumerate(captions)]

    def _bans(self, settings: GenerationSettings, objects: list[list[Detection]] | None,
              named: list[list[str]] | None) -> WordBans | None:
        """With settings.forbid_absent: per image, the words for what it does not show (capcli.absent): every
        COCO category the detector scores below settings.absent_below and no label told names."""
        if not settings.forbid_absent:
            return None
        if objects is None:
            raise ModelError("--forbid-absent reads the object detector's objects: load the captioner with "
                             "objects=True (the command line does)")
        told = named or [[] for _ in objects]
        absent = [absent_objects(row, labels, settings.absent_below) for row, labels in zip(objects, told)]
        return self._word_bans([[w for thing in row for w in absent_words(thing)] for row in absent])

    def _word_bans(self, words_per_image: list[list[str]]) -> WordBans:
        forbidden, allowed = [], []
        for row in words_per_image:
            words = set(row)
            # Compound nouns that end in a forbidden word but name something else ("hot dog", "teddy bear").
            compounds = [c for c in compound_nouns() if c.split()[-1] in words and c not in words]
            forbidden.append(self._tokens(sorted(words)))
            allowed.append(self._tokens(compounds))
        return WordBans(forbidden, allowed)

    def _tokens(self, words: list[str]) -> list[list[int]]:
        missing = [w for w in words if w not in self._word_ids]
        if missing:
            self._word_ids.update(zip(missing, (self.model.word_tokens([w]) for w in missing)))
        return [ids for w in words for ids in self._word_ids[w]]

    def _vote(self, features: torch.Tensor, pooled: torch.Tensor, settings: GenerationSettings,
              named: list[list[str]] | None, bans: WordBans | None,
              ) -> tuple[list[list[str]], list]:
        """Decode `candidates` captions per image (beam search's N best, or N samples) and order them by how
        much the nearest images' captions agree with each (CIDEr-D); keep the best `num_captions`."""
        wide = max(settings.candidates, settings.num_captions)
        decoding = dataclasses.replace(settings, num_captions=wide,
                                       beams=settings.beams if settings.sample else max(settings.beams, wide))
        neighbours = self.memory.nearest(pooled, settings.neighbours)
        ordered = []
        for candidates, near in zip(self.model.generate(features, decoding, named, bans), neighbours):
            ranked = self.memory.ranked(candidates, near)
            ordered.append((ranked * settings.num_captions)[: settings.num_captions])
        return ordered, neighbours

    def caption(self, images: Iterable, batch_size: int = 16, **options) -> list:
        """Caption PIL images or paths. Returns one caption per image, or a list of K with num_captions=K.
        An unreadable path raises InputError; use caption_paths to go on past bad files."""
        settings = self.settings(**options)
        results = [r.captions for r in self._caption_images(images, settings, batch_size, with_labels=False)]
        return [r[0] for r in results] if settings.num_captions == 1 else results

    def describe(self, images: Iterable, batch_size: int = 16, **options) -> list[Captioned]:
        """caption(), with the nouns the encoder sees: [Captioned(captions, labels)]."""
        return self._caption_images(images, self.settings(**options), batch_size, with_labels=True)

    def _caption_images(self, images: Iterable, settings: GenerationSettings, batch_size: int,
                        with_labels: bool) -> list[Captioned]:
        from PIL import Image

        from capcli.images import open_image

        pictures = [img.convert("RGB") if isinstance(img, Image.Image) else open_image(img) for img in images]
        results: list[Captioned] = []
        for start in range(0, len(pictures), batch_size):
            part = pictures[start: start + batch_size]
            objects = [self.detector.detect(p) for p in part] if self.detector is not None else None
            batch = torch.stack([self.encoder.preprocess(p) for p in part])
            results.extend(self.caption_tensors(batch, settings, with_labels, objects))
        return results

    def caption_paths(self, paths: list[Path], settings: GenerationSettings, batch_size: int | None = None,
                      workers: int | None = None, with_labels: bool = False) -> Iterator[tuple[Path, Captioned | InputError]]:
        """Yield (path, Captioned) or (path, InputError) for each path, in input order, decoding in parallel.
        batch_size defaults to 64 on a GPU and 16 on a CPU (`python benchmarks/sweeps.py caption`)."""
        from capcli.images import image_batches

        batch_size = batch_size or (64 if self.device.type == "cuda" else 16)
        for indices, images, failed, objects in image_batches(paths, self.encoder.preprocess, batch_size, workers,
                                                              self.detector):
            results = self.caption_tensors(images, settings, with_labels, objects) if images is not None else []
            done = {i: c for i, c in zip(indices, results)}
            done.update(dict(failed))
            for i in sorted(done):
                yield paths[i], done[i]
