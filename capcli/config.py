"""Settings as plain dataclasses: what a model dir's `config.json` holds, and how to decode."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from capcli.errors import ModelError

FORMAT_VERSION = 1
# Keys of config.json that earlier versions wrote for what capcli no longer has (experiments/README.md): read
# and dropped while they ask for nothing ("retrieval": null), refused in one line when they do.
RETIRED_KEYS = {"num_layers": "the transformer mapper", "num_heads": "the transformer mapper",
                "retrieval": "retrieval hints in the prompt"}
DEVICES = ("auto", "cpu", "cuda", "mps")
DEFAULT_ENCODER = "efficientnet-lite0"
DEFAULT_LM = "smollm2-135m"


@dataclass
class GroundingConfig:
    """Labels in the prompt: the prefix, then text naming what the encoder's classifier sees, then the caption.
    In training the labels are the caption's own nouns (some dropped, some swapped for another noun of the
    same kind in both the labels and the caption), so the model learns to follow them."""

    template: str = " Objects: {labels}. Caption:"  # text after the prefix; {labels} is "cat, sofa"
    no_labels: str = "none"  # what {labels} becomes when there are none
    threshold: float = 0.3  # captioning: a label is used when its summed class probability reaches this
    max_labels: int = 3  # captioning: at most this many labels, objects first, then the classifier's nouns
    drop: float = 0.4  # training: probability of leaving out each label
    swap: float = 0.2  # training on captions' nouns: probability of swapping one noun for another of its kind
    object_threshold: float = 0.7  # models with a detector: an object is told when its best detection reaches this,
    count_threshold: float = 0.5  # with its count of detections scoring at least this (not above object_threshold)
    # training: "captions" tells each caption's own nouns (dropped and swapped); "machine" tells what captioning
    # tells (the detector's objects and the classifier's nouns for the photo), each label dropped with `drop`;
    # "mix" tells one or the other, drawn half and half for each caption.
    train_labels: str = "captions"

    def __post_init__(self):
        if "{labels}" not in self.template:
            raise ModelError("grounding template must contain {labels}")
        if not all(0 <= v <= 1 for v in (self.drop, self.swap, self.threshold, self.object_threshold)):
            raise ModelError("grounding drop, swap, threshold and object_threshold must lie between 0 and 1")
        if not 0 <= self.count_threshold <= self.object_threshold:
            raise ModelError("grounding count_threshold must lie between 0 and object_threshold")
        if self.train_labels not in ("captions", "machine", "mix"):
            raise ModelError(f"grounding train_labels must be captions, machine or mix, not {self.train_labels!r}")

    def text(self, labels: list[str]) -> str:
        return self.template.format(labels=", ".join(labels) if labels else self.no_labels)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a captioning model. Only the mapper's weights are saved beside it;
    the encoder and the language model are named (and fingerprinted) so a mismatch can be refused."""

    encoder: str  # encoder name, e.g. "efficientnet-lite0"
    encoder_id: str  # name plus a weights fingerprint, e.g. "efficientnet-lite0@57934424"
    feature_dim: int  # D
    num_tokens: int  # N grid tokens per image
    lm: str  # how the LM was asked for: alias, hub name, folder or .gguf path
    lm_id: str  # the LM's fingerprint (file sha256 or hub revision)
    lm_width: int  # E
    mapper: str = "mlp"  # the MLP of ClipCap, the one kind
    prefix_length: int = 10  # P
    hidden_size: int = 1024
    dropout: float = 0.0
    prompt: str = ""
    grounding: GroundingConfig | None = None  # labels in the prompt; None: the prefix alone
    detector: str | None = None  # the object detector whose objects ground the captions (capcli.steering.detector)
    min_score: float = 0.5  # outputs and keywords leave out labels and objects scoring less (chosen on dev)
    encoder_weights: str | None = None  # the weights file trained with, if not the packaged or hub weights
    generation: dict = field(default_factory=dict)  # default decoding settings (DecodingSettings fields, flat)
    training: dict = field(default_factory=dict)  # provenance: how it was trained
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.mapper != "mlp":
            raise ModelError(f"mapper {self.mapper!r} was an experiment that capcli 0.5 no longer runs (see "
                             f"experiments/README.md); caption with capcli 0.4, or train an mlp mapper")
        if self.prefix_length < 1:
            raise ModelError(f"prefix length must be at least 1, got {self.prefix_length}")
        if not 0 <= self.min_score <= 1:
            raise ModelError(f"min_score must lie between 0 and 1, got {self.min_score}")
        if isinstance(self.grounding, dict):
            self.grounding = _strict(GroundingConfig, self.grounding, "grounding")
        unknown = sorted(set(self.generation) - DecodingSettings.field_names())
        if unknown:
            raise ModelError(f"unknown key 'generation.{unknown[0]}'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config.json") -> "ModelConfig":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelError(
                f"{source}: format version {version!r} is not supported (this capcli reads version "
                f"{FORMAT_VERSION}); upgrade capcli or retrain the model"
            )
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ModelError(f"{source}: missing field(s) {', '.join(missing)}")
        data = _without_retired(data, source)
        try:
            return _strict(cls, data, "")
        except ModelError as exc:
            raise ModelError(f"{source}: {exc}") from None

    def save(self, path: Path) -> None:
        from capcli.files import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(f"{path}: not found; a model dir needs config.json (written by `capcli train`)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path}: cannot read it as JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ModelError(f"{path}: expected a JSON object")
        return cls.from_dict(data, source=str(path))


def _without_retired(data: dict, source: str) -> dict:
    """config.json without the keys of retired experiments; one that still asks for its experiment is refused."""
    if data.get("retrieval") is not None:
        raise ModelError(f"{source}: this model puts {RETIRED_KEYS['retrieval']}, an experiment that capcli 0.5 "
                         f"no longer runs (see experiments/README.md); caption with capcli 0.4")
    return {k: v for k, v in data.items() if k not in RETIRED_KEYS}


def _strict(cls, data: dict, where: str):
    """cls(**data), refusing keys it does not have (a typo must not be dropped without a word)."""
    if not isinstance(data, dict):
        raise ModelError(f"'{where}' must be a JSON object")
    unknown = sorted(set(data) - field_names(cls))
    if unknown:
        raise ModelError(f"unknown key '{where + '.' if where else ''}{unknown[0]}'")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ModelError(str(exc)) from None


def field_names(*classes) -> set[str]:
    """The fields of these dataclasses, by name."""
    return {f.name for cls in classes for f in dataclasses.fields(cls)}


# What `capcli train` writes into a new model dir's `generation`: the shipped model's decoding, so that a model
# trained here captions (and is evaluated) the way the default is unless the user says otherwise.
TRAINED_DECODING = {"beams": 3, "no_repeat_ngram_size": 3, "forbid_absent": True}


@dataclass
class GenerationSettings:
    """transformers' `generate()` settings under the CLI's names; `generate_kwargs` passes them through whole.
    Greedy by default; beams and sampling are opt-in."""

    max_new_tokens: int = 30
    min_new_tokens: int = 0
    beams: int = 1
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_captions: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0  # beam search: a beam's log-probability is divided by its length to this power
    seed: int | None = None  # seeds torch before decoding (sampling)

    def generate_kwargs(self) -> dict:
        """The settings of transformers' GenerationConfig: sampling's only when sampling, the length penalty
        only for beam search (transformers warns about settings that do nothing)."""
        return dict(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens, num_beams=self.beams,
                    do_sample=self.sample, num_return_sequences=self.num_captions,
                    temperature=self.temperature if self.sample else None,
                    top_p=self.top_p if self.sample else None, top_k=self.top_k if self.sample else None,
                    repetition_penalty=self.repetition_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size,
                    length_penalty=self.length_penalty if self.beams > 1 else None)

    def validate(self) -> None:
        from capcli.errors import CapcliError

        if self.beams < 1 or self.num_captions < 1 or self.max_new_tokens < 1:
            raise CapcliError("--beams, --num-captions and --max-new-tokens must be at least 1")
        if self.min_new_tokens > self.max_new_tokens:
            raise CapcliError("--min-new-tokens cannot exceed --max-new-tokens")
        if not self.sample and self.num_captions > self.beams:
            raise CapcliError("--num-captions N needs --sample or --beams >= N")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise CapcliError("--temperature must be > 0 and --top-p in (0, 1]")


@dataclass
class SteeringSettings:
    """capcli's own steering of the words (the stages of capcli.steering.stages read it)."""

    forbid_absent: bool = False  # no words for what the object detector does not see (capcli.steering.absent)
    absent_below: float = 0.3  # with forbid_absent: a COCO object the detector scores below this is absent
    neighbours: int = 5  # with a memory: how many similar images' captions vote on the candidates
    candidates: int = 5  # with a memory: captions decoded (beam search's N best) before the vote

    def validate(self) -> None:
        from capcli.errors import CapcliError

        if not 0 <= self.absent_below <= 1:
            raise CapcliError("--absent-below must lie between 0 and 1")
        if self.neighbours < 1 or self.candidates < 1:
            raise CapcliError("--neighbours and --candidates must be at least 1")


@dataclass(frozen=True)
class DecodingSettings:
    """How to caption: transformers' generation settings and capcli's steering. Options, `Captioner.caption`'s
    keywords and config.json's "generation" name the fields of both, flat (beams, forbid_absent, ...)."""

    generation: GenerationSettings = field(default_factory=GenerationSettings)
    steering: SteeringSettings = field(default_factory=SteeringSettings)

    PARTS = {"generation": GenerationSettings, "steering": SteeringSettings}

    @classmethod
    def field_names(cls) -> set[str]:
        return field_names(*cls.PARTS.values())

    def updated(self, **changes) -> "DecodingSettings":
        """A copy with the given fields replaced, ignoring None (an option the user did not pass); a name that
        is no field of either part is refused, naming it, rather than dropped without a word."""
        from capcli.errors import CapcliError

        unknown = sorted(set(changes) - self.field_names())
        if unknown:
            raise CapcliError(f"unknown decoding option {unknown[0]!r} (the options are the fields of "
                              f"GenerationSettings and SteeringSettings: beams, max_new_tokens, forbid_absent, ...)")
        parts = {name: dataclasses.replace(getattr(self, name), **{k: v for k, v in changes.items()
                                                                   if k in field_names(part) and v is not None})
                 for name, part in self.PARTS.items()}
        return DecodingSettings(**parts)

    def validate(self) -> "DecodingSettings":
        self.generation.validate()
        self.steering.validate()
        return self

    def flat(self) -> dict:
        """Every field by name, as options and config.json name them."""
        return {**dataclasses.asdict(self.generation), **dataclasses.asdict(self.steering)}


@dataclass
class TrainSettings:
    """How to train (recorded in config.json's "training" and in every checkpoint)."""

    epochs: int = 5  # passes over the captions
    batch_size: int = 32  # captions per step ("cider": images per step); the global batch, whatever the processes
    lr: float = 5e-4  # peak learning rate (AdamW), after a linear warm-up, then cosine decay to a tenth
    warmup_steps: int = 100  # steps of linear warm-up
    weight_decay: float = 0.01  # AdamW weight decay
    max_caption_tokens: int = 40  # longer captions are cut (the end-of-text token included)
    seed: int = 0  # shuffling, initialisation and grounded training's label draws
    max_steps: int | None = None  # stop (and end the schedule) after this many steps
    checkpoint_every: int = 100  # steps between checkpoints
    log_every: int = 10  # steps between lines of train_log.jsonl
    sample_captions: int = 3  # captions shown per epoch, on stderr and in the log
    precision: str = "auto"  # autocast: see devices.autocast
    init: str | None = None  # model dir whose mapper weights the run starts from (same encoder, LM and sizes)
    objective: str = "xent"  # "xent": cross-entropy on the captions; "cider": self-critical, on sampled captions' CIDEr-D
    samples: int = 5  # captions sampled per image by the "cider" objective
    xent_weight: float = 0.0  # "cider": weight of the cross-entropy of one reference caption per image, added
    # to the self-critical loss (a mixed objective, Paulus et al. 2017) against collapse onto short, generic captions
    object_penalty: float = 0.0  # "cider": taken off a sample's reward per object it names that no reference names
    tune_labels: str = "classifier"  # "cider", grounded models: the labels in the prompt are the classifier's (as
    # when captioning) or "captions": one training caption's own nouns, some dropped (as in grounded cross-entropy)
