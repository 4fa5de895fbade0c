"""The CLI's options, declared once: each is named like the field it fills (a job's, or the decoding or
training settings'), and `job_from` builds a job from a command's options by those names, so that an option
without a field is a wiring bug that a test catches, never a setting silently dropped."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from capcli.config import DEFAULT_ENCODER, DEFAULT_LM, DEVICES, GroundingConfig, TrainSettings, field_names
from capcli.errors import CapcliError

Device = Enum("Device", {name: name for name in DEVICES}, type=str)


def _choices(name: str, *values: str):
    return Enum(name, {value: value for value in values}, type=str)


Objective = _choices("Objective", "xent", "cider")
TrainLabels = _choices("TrainLabels", "captions", "machine", "mix")
TuneLabels = _choices("TuneLabels", "classifier", "captions")
Precision = _choices("Precision", "auto", "fp32", "bf16")
Format = _choices("Format", "text", "jsonl", "csv", "html")
MemoryMode = _choices("MemoryMode", "replace", "add")
SidecarName = _choices("SidecarName", "stem", "full")
Existing = _choices("Existing", "skip", "overwrite", "append", "prepend")


def job_from(job_class, options: dict, **homes: set[str]):
    """job_class(**options) by name. An option that is no field of the job is one of the field names of a
    home (e.g. decoding=DecodingSettings.field_names()): the job's field of that home's name gets those as a
    dict, without the options left at None (the model's or the run's own value then holds). Choices become
    their strings."""
    own = field_names(job_class)
    fields, nested = {}, {name: {} for name in homes}
    for name, value in options.items():
        value = value.value if isinstance(value, Enum) else value
        if name in own:
            fields[name] = value
            continue
        home = next((h for h, names in homes.items() if name in names), None)
        if home is None:
            raise TypeError(f"option {name!r} fills no field of {job_class.__name__} or {', '.join(homes) or '-'}")
        if value is not None:
            nested[home][name] = value
    return job_class(**fields, **nested)


def train_job_from(options: dict):
    """The TrainJob of train's options: the --grounded ones make the model's grounding, --objects its detector."""
    from capcli.jobs import TrainJob
    from capcli.steering.detector import DEFAULT_DETECTOR

    missing = [f"--{name}" for name in ("data", "out") if options[name] is None]
    if missing:
        raise CapcliError(f"train needs {' and '.join(missing)} (on the command line or in --config)")
    told = {"drop": options.pop("label_drop"), "swap": options.pop("label_swap"),
            "train_labels": options.pop("train_labels")}
    told["train_labels"] = getattr(told["train_labels"], "value", told["train_labels"])
    if options.pop("grounded"):
        options["grounding"] = GroundingConfig(**{k: v for k, v in told.items() if v is not None})
    elif any(v is not None for v in told.values()):
        raise CapcliError("--label-drop, --label-swap and --train-labels shape --grounded training: add --grounded")
    else:
        options["grounding"] = None
    options["detector"] = DEFAULT_DETECTOR if options.pop("objects") else None
    options["init"] = str(options["init"]) if options["init"] else None
    return job_from(TrainJob, options, settings=field_names(TrainSettings))


_opt = typer.Option  # short, for the many declarations below


# Shared by several commands.
DeviceOpt = Annotated[Device, _opt(metavar="DEVICE", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps.")]
PRECISION_HELP = "auto: bf16 autocast on CUDA, fp32 elsewhere; bf16 also speeds up CPUs with AVX512-BF16/AMX."
PrecisionOpt = Annotated[Precision, _opt(metavar="P", help=PRECISION_HELP)]
QuietOpt = Annotated[bool, _opt("--quiet", "-q", help="No progress bars or messages on stderr.")]
EncoderWeightsOpt = Annotated[Optional[Path], _opt(metavar="FILE", help="Encoder weights, instead of the packaged or "
                                                   "hub ones.")]
BatchOpt = Annotated[Optional[int], _opt(min=1, metavar="N", help="Images per batch (default: 16 on a CPU, 64 on a "
                                         "GPU).")]
WorkersOpt = Annotated[Optional[int], _opt(min=0, metavar="N", help="Image-decoding processes (default: up to 4).")]
ModelOpt = Annotated[Optional[Path], _opt(metavar="DIR", help="Model dir (default: the shipped model, also named "
                                          "default).")]
SplitOpt = Annotated[Optional[Path], _opt(metavar="FILE", help="File naming the images to use, one a line.")]
DataOpt = Annotated[Path, _opt(metavar="PATH", help="Data set: a folder or a captions file (see README).")]
FeaturesOpt = Annotated[Optional[Path], _opt(metavar="DIR", help="Feature cache (default: CAPCLI_CACHE/features).")]
ShardOpt = Annotated[Optional[str], _opt(metavar="I/N", help="Take part I of N of the inputs, by a stable hash of "
                                         "each path: e.g. $SLURM_ARRAY_TASK_ID/100.")]

# Decoding (DecodingSettings: GenerationSettings and SteeringSettings); None: the model's own.
BeamsOpt = Annotated[Optional[int], _opt(min=1, metavar="N", help="Beam search width (1: greedy).")]
MaxNewOpt = Annotated[Optional[int], _opt(min=1, metavar="N", help="Longest caption, in tokens.")]
MinNewOpt = Annotated[Optional[int], _opt(min=0, metavar="N", help="Shortest caption, in tokens.")]
NoRepeatOpt = Annotated[Optional[int], _opt(min=0, metavar="N",
                                            help="Never repeat an n-gram of N tokens (0: allow).")]
LengthPenaltyOpt = Annotated[Optional[float], _opt(metavar="X", help="Beam search: above 1 (the default) favours "
                                                   "longer captions.")]
ForbidAbsentOpt = Annotated[Optional[bool], _opt(
    "--forbid-absent/--allow-absent", show_default=False,
    help="Forbid the words of what the object detector does not see (man, dog, ...), or not (default: the model's).")]
AbsentBelowOpt = Annotated[Optional[float], _opt(min=0, max=1, metavar="X", help="With --forbid-absent: a COCO "
                                                 "object scoring below X is absent (default: the model's, 0.3).")]
SampleOpt = Annotated[Optional[bool], _opt("--sample", help="Sample instead of greedy/beam decoding.")]
TemperatureOpt = Annotated[Optional[float], _opt(metavar="X", help="Sampling temperature.")]
TopPOpt = Annotated[Optional[float], _opt(metavar="X", help="Sampling: keep tokens within this probability mass.")]
TopKOpt = Annotated[Optional[int], _opt(metavar="K", help="Sampling: keep the K most likely tokens (0: all).")]
SeedOpt = Annotated[Optional[int], _opt(metavar="N", help="Random seed for sampling.")]
NumCaptionsOpt = Annotated[Optional[int], _opt(min=1, metavar="N", help="Captions per image.")]
PromptOpt = Annotated[Optional[str], _opt(metavar="TEXT", help="Replaces the model's text prompt after the prefix.")]

# Retrieval memories.
MemoriesOpt = Annotated[Optional[list[Path]], _opt("--memory", metavar="DIR", help="A memory (capcli memory build): "
                        "similar images' captions pick among candidates. Repeatable.")]
MemoryModeOpt = Annotated[MemoryMode, _opt(metavar="MODE", help="The memories replace the model's own (replace), or "
                                           "join it (add).")]
NeighboursOpt = Annotated[Optional[int], _opt(min=1, metavar="N", help="Similar images whose captions vote "
                                              "(default: 5).")]
CandidatesOpt = Annotated[Optional[int], _opt(min=1, metavar="N", help="Captions decoded for the vote (default: 5).")]

# caption's outputs.
PathsArg = Annotated[list[str], typer.Argument(metavar="PATH", show_default=False,
                                               help="Images, folders, globs, or - to read paths from stdin.")]
RecursiveOpt = Annotated[bool, _opt("--recursive", "-r", help="Walk folders recursively.")]
FormatOpt = Annotated[Format, _opt("--format", "-f", metavar="FORMAT", show_default=False,
                                   help="text (path<TAB>caption, the default), jsonl, csv, or html (a contact sheet).")]
OutputOpt = Annotated[Optional[Path], _opt("--output", "-o", metavar="FILE", help="Write to FILE, not stdout.")]
ResumeOutputOpt = Annotated[bool, _opt("--resume", help="With -o: skip images already in FILE and append.")]
SidecarOpt = Annotated[Optional[str], _opt(metavar="SUFFIX", help="Write each caption beside its image: .txt, or "
                                           ".xmp (XMP).")]
SidecarDirOpt = Annotated[Optional[Path], _opt(metavar="DIR", help="Sidecars under DIR, mirroring the input folders.")]
SidecarNameOpt = Annotated[SidecarName, _opt(metavar="stem|full", show_default=False,
                                             help="a.jpg gets a.txt (the default) or a.jpg.txt.")]
EmbedOpt = Annotated[bool, _opt("--embed", help="Write the caption into the image's metadata (XMP; EXIF for JPEG), "
                                "with exiftool.")]
ExistingOpt = Annotated[Existing, _opt(metavar="ACTION", show_default=False, help="Captions already there: skip "
                                       "(the default), overwrite, append or prepend (text sidecars).")]
JoinOpt = Annotated[str, _opt(metavar="TEXT", show_default=False, help="Between the old caption and the appended or "
                                                                      "prepended one (default: \", \").")]
CaptionPrefixOpt = Annotated[str, _opt(metavar="TEXT", show_default=False, help="Before every caption: \"photo of "
                                                                                "sks, \".")]
CaptionSuffixOpt = Annotated[str, _opt(metavar="TEXT", show_default=False, help="After every caption.")]
LabelsOpt = Annotated[bool, _opt("--labels", "--objects", help="Also output the detected objects (boxes) and the "
                                 "classifier's nouns, with scores (keywords in XMP and --embed).")]
MinScoreOpt = Annotated[Optional[float], _opt(min=0, max=1, metavar="X", help="With --labels: leave out what scores "
                                              "less (default: the model's, 0.5).")]
ExplainOpt = Annotated[bool, _opt("--explain", help="With a memory and -f jsonl: list the neighbours that voted.")]

# extract, eval and memory build.
ExtractEncoderOpt = Annotated[str, _opt(metavar="NAME", help="Image encoder: efficientnet-lite0/1/2 or a torchvision model name.")]
ExtractBatchOpt = Annotated[Optional[int], _opt(min=1, metavar="N", help="Images per batch (default: 4 on a CPU, 64 on a GPU).")]
ExtractObjectsOpt = Annotated[bool, _opt("--objects", help="Also detect each image's objects (COCO detector), for "
                                         "training --grounded --objects models.")]
PredictionsOpt = Annotated[Optional[Path], _opt("--output", "-o", help="Write predictions (JSON lines) here.")]
ReportOpt = Annotated[Optional[Path], _opt(help="Write an HTML report here: worst captions first.")]
MemoryOutOpt = Annotated[Path, _opt(help="The memory dir to write.")]

# train.
TrainDataOpt = Annotated[Optional[Path], _opt(help="Data set: a folder or a captions file (see README).")]
ValSplitOpt = Annotated[Optional[Path], _opt(help="Validation images, one name a line.")]
ConfigOpt = Annotated[Optional[Path], _opt(help="A recipe (TOML, JSON or YAML) of these options by name (lr = "
                                           "5e-4); options given here win. See recipes/.")]
TrainOutOpt = Annotated[Optional[Path], _opt(help="Model dir to write (config.json, mapper.safetensors, checkpoint).")]
EncoderOpt = Annotated[Optional[str], _opt(help=f"Image encoder: efficientnet-lite0/1/2 or a torchvision model "
                                           f"name [default: {DEFAULT_ENCODER}].")]
LmOpt = Annotated[Optional[str], _opt(help=f"Frozen LM: smollm2-135m, a hub name, a local folder or a .gguf file "
                                      f"[default: {DEFAULT_LM}].")]
PrefixLengthOpt = Annotated[Optional[int], _opt(min=1, help="P, the number of prefix embeddings [default: 10].")]
HiddenSizeOpt = Annotated[Optional[int], _opt(min=1, help="Mapper width [default: 1024].")]
TrainPromptOpt = Annotated[Optional[str], _opt(help="Text placed after the prefix, before the caption.")]
GroundedOpt = Annotated[bool, _opt("--grounded", help="Name what the encoder's classifier sees in the prompt "
                                   "(trained on the captions' own nouns).")]
LabelDropOpt = Annotated[Optional[float], _opt(min=0, max=1, help="--grounded: chance of leaving out each of a "
                                               "caption's nouns [default: 0.4].")]
LabelSwapOpt = Annotated[Optional[float], _opt(min=0, max=1, help="--grounded: chance of swapping a noun for another "
                                               "of its kind (dog -> cat) in labels and caption [default: 0.2].")]
ObjectsOpt = Annotated[bool, _opt("--objects", help="--grounded: also tell the COCO object detector's objects, with "
                                  "counts (\"2 people, dog\"); captioning then runs the detector.")]
TrainLabelsOpt = Annotated[Optional[TrainLabels], _opt(help="--grounded: train on each caption's own nouns "
                           "(captions), on the labels captioning tells for the photo (machine), or half and half "
                           "(mix) [default: captions].")]
InitOpt = Annotated[Optional[Path], _opt(help="Start from this model dir's mapper weights (same encoder, LM and "
                                         "sizes).")]
EpochsOpt = Annotated[Optional[int], _opt(min=1, help="Passes over the captions [default: 5; with --resume: the "
                                          "run's own].")]
ObjectiveOpt = Annotated[Optional[Objective], _opt(help="xent: cross-entropy on the captions; cider: self-critical "
                         "fine-tuning of the --init model, rewarding sampled captions' CIDEr-D [default: xent].")]
SamplesOpt = Annotated[Optional[int], _opt(min=2, help="--objective cider: captions sampled per image [default: 5].")]
XentWeightOpt = Annotated[Optional[float], _opt(min=0, help="--objective cider: add this times the cross-entropy of "
                          "one reference caption per image, against collapse onto short, generic captions "
                          "[default: 0].")]
ObjectPenaltyOpt = Annotated[Optional[float], _opt(min=0, help="--objective cider: take this off a sampled "
                             "caption's reward for each object (COCO category) it names that none of the image's "
                             "references names [default: 0].")]
TuneLabelsOpt = Annotated[Optional[TuneLabels], _opt(help="--objective cider, grounded models: the labels in the "
                          "prompt are the classifier's (classifier, as when captioning) or a training caption's own "
                          "nouns (captions, as in --grounded training) [default: classifier].")]
TrainBatchOpt = Annotated[Optional[int], _opt(min=1, help="Captions per step (images per step with --objective "
                                              "cider) [default: 32].")]
LrOpt = Annotated[Optional[float], _opt(help="Peak learning rate (AdamW, warm-up then cosine decay) [default: 5e-4].")]
WarmupOpt = Annotated[Optional[int], _opt(min=1, help="Steps of linear learning-rate warm-up before the cosine decay "
                                          "[default: 100].")]
MaxCaptionTokensOpt = Annotated[Optional[int], _opt(min=2, help="Longer captions are cut to this many tokens, end of "
                                                    "text included [default: 40].")]
MaxStepsOpt = Annotated[Optional[int], _opt(min=1, help="Stop after N steps (the schedule ends there).")]
CheckpointEveryOpt = Annotated[Optional[int], _opt(min=1, help="Save a checkpoint every N steps [default: 100].")]
TrainSeedOpt = Annotated[Optional[int], _opt(help="Seed of the shuffling, the initialisation and the label draws "
                                             "[default: 0].")]
ResumeRunOpt = Annotated[bool, _opt(help="Continue the run in --out from its checkpoint, with its own settings.")]
TrainPrecisionOpt = Annotated[Optional[Precision], _opt(help=PRECISION_HELP)]

# train's options, in the order of its --help.
TRAINING = {
    "data": (TrainDataOpt, None), "out": (TrainOutOpt, None), "config": (ConfigOpt, None), "split": (SplitOpt, None),
    "val_split": (ValSplitOpt, None), "features": (FeaturesOpt, None), "encoder": (EncoderOpt, None),
    "encoder_weights": (EncoderWeightsOpt, None), "lm": (LmOpt, None), "prefix_length": (PrefixLengthOpt, None),
    "hidden_size": (HiddenSizeOpt, None), "prompt": (TrainPromptOpt, None), "grounded": (GroundedOpt, False),
    "label_drop": (LabelDropOpt, None), "label_swap": (LabelSwapOpt, None), "objects": (ObjectsOpt, False),
    "train_labels": (TrainLabelsOpt, None), "init": (InitOpt, None), "epochs": (EpochsOpt, None),
    "objective": (ObjectiveOpt, None), "samples": (SamplesOpt, None), "xent_weight": (XentWeightOpt, None),
    "object_penalty": (ObjectPenaltyOpt, None), "tune_labels": (TuneLabelsOpt, None),
    "batch_size": (TrainBatchOpt, None), "lr": (LrOpt, None), "warmup_steps": (WarmupOpt, None),
    "max_caption_tokens": (MaxCaptionTokensOpt, None), "max_steps": (MaxStepsOpt, None),
    "checkpoint_every": (CheckpointEveryOpt, None), "seed": (TrainSeedOpt, None), "resume": (ResumeRunOpt, False),
    "device": (DeviceOpt, Device.auto), "precision": (TrainPrecisionOpt, None),
}

# The options caption and eval share, as (annotation, default); console.command adds them to both.
CAPTIONING = {
    "model": (ModelOpt, None), "beams": (BeamsOpt, None), "max_new_tokens": (MaxNewOpt, None),
    "min_new_tokens": (MinNewOpt, None), "no_repeat_ngram_size": (NoRepeatOpt, None),
    "length_penalty": (LengthPenaltyOpt, None), "forbid_absent": (ForbidAbsentOpt, None),
    "absent_below": (AbsentBelowOpt, None), "memories": (MemoriesOpt, None),
    "memory_mode": (MemoryModeOpt, MemoryMode.replace), "neighbours": (NeighboursOpt, None),
    "candidates": (CandidatesOpt, None), "batch_size": (BatchOpt, None), "workers": (WorkersOpt, None),
    "device": (DeviceOpt, Device.auto), "precision": (PrecisionOpt, Precision.auto),
    "encoder_weights": (EncoderWeightsOpt, None),
}

# The options extract and memory build share (both encode a data set's images into the feature cache).
ENCODING = {
    "split": (SplitOpt, None), "batch_size": (ExtractBatchOpt, None), "workers": (WorkersOpt, None),
    "device": (DeviceOpt, Device.auto), "encoder_weights": (EncoderWeightsOpt, None),
}

# Options by what they are for, so that `--help` shows them in groups (rich help panels); the rest stay under
# "Options".
PANELS = {
    "Output": ("format", "output", "resume", "sidecar", "sidecar_dir", "sidecar_name", "embed", "existing", "join",
               "caption_prefix", "caption_suffix", "labels", "min_score", "explain", "report"),
    "Decoding": ("beams", "sample", "temperature", "top_p", "top_k", "seed", "num_captions", "max_new_tokens",
                 "min_new_tokens", "no_repeat_ngram_size", "length_penalty", "forbid_absent", "absent_below",
                 "prompt"),
    "Retrieval memory": ("memories", "memory_mode", "neighbours", "candidates"),
    "Jobs and devices": ("shard", "batch_size", "workers", "device", "precision", "encoder_weights"),
}
PANEL_OF = {name: panel for panel, names in PANELS.items() for name in names}


def in_panel(param, panel: str | None):
    """The parameter with a copy of its typer.Option placed in a help panel (options are shared by commands)."""
    import copy
    import typing

    if panel is None or typing.get_origin(param.annotation) is not Annotated:
        return param
    kind, *extras = typing.get_args(param.annotation)
    placed = []
    for extra in extras:
        if isinstance(extra, typer.models.OptionInfo):
            extra = copy.copy(extra)
            extra.rich_help_panel = panel
        placed.append(extra)
    return param.replace(annotation=Annotated[(kind, *placed)])
