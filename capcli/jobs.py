"""One function per command: a settings dataclass and a Reporter in, a result out. Resume, sidecars, shards,
the CSV header and merging launched processes' parts live here; `capcli.cli` only parses and calls.
Nothing here prints: messages go to the reporter, captions to the output stream given."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TextIO

from capcli.config import DEFAULT_ENCODER, DEFAULT_LM, TRAINED_DECODING, GroundingConfig, ModelConfig
from capcli.data.shards import Shard, job_shard
from capcli.errors import CapcliError, InputError
from capcli.reporting import Reporter


@dataclass
class JobResult:
    """How many inputs were done, failed (each reported to the reporter) or skipped as done before."""

    done: int = 0
    failed: int = 0
    skipped: int = 0


@dataclass(kw_only=True)
class ExtractJob:
    data: Path  # data set: a folder or a captions file
    out: Path | None = None  # feature cache (default: the capcli cache's features/)
    split: Path | None = None  # the images to use, one name a line
    encoder: str = DEFAULT_ENCODER
    encoder_weights: Path | None = None  # weights file instead of the packaged or hub weights
    shard: str | None = None  # "I/N": take part I of N of the images
    batch_size: int | None = None  # images per encoder forward (default: 4 on a CPU, 64 on a GPU)
    workers: int | None = None  # image-decoding processes
    device: str = "auto"
    detector: str | None = None  # also detect each image's objects with this detector (capcli.steering.detector)


def extract_job(job: ExtractJob, report: Reporter = Reporter()) -> JobResult:
    """Encode every image of a data set once into the feature cache (only what is missing)."""
    from capcli.data.captions import load_captions
    from capcli.data.features import FeatureCache, extract
    from capcli.devices import resolve_device
    from capcli.files import cache_dir
    from capcli.model.encoders import load_encoder
    from capcli.steering.detector import load_detector

    device = resolve_device(job.device)
    captions = load_captions(job.data, job.split)
    cache = FeatureCache(job.out or cache_dir() / "features")
    encoder = load_encoder(job.encoder, job.encoder_weights)
    part = job_shard(job.shard)
    root = job.data if job.data.is_dir() else job.data.parent
    images = [p for p in captions.images if Path(os.path.relpath(p, root)).as_posix() in part]
    report.line(captions.report())
    if not part.everything:
        report.line(f"{part.describe()}: {len(images)} of {len(captions.images)} images")
    started = time.monotonic()
    detector = load_detector(job.detector, log=report.line) if job.detector else None
    _, encoded, failures = extract(images, encoder, cache, device, job.batch_size, job.workers,
                                   progress=report.progress(len(images), "extract"), detector=detector)
    seconds = time.monotonic() - started
    report.end_progress()
    for error in failures:
        report.warn(str(error))
    rate = f" ({encoded / seconds:.1f} images/s)" if encoded else ""
    cached = len(images) - encoded - len(failures)
    report.line(f"encoded {encoded} images in {seconds:.1f} s{rate}; {cached} were cached already (or copies of "
                f"another image); {len(failures)} failed; cache: {cache.folder}")
    return JobResult(done=encoded, failed=len(failures), skipped=cached)


@dataclass(kw_only=True)
class MemoryJob:
    """`capcli memory build`: a retrieval memory of a data set's images and captions, for one model's encoder."""

    data: Path  # data set: a folder or a captions file
    out: Path  # the memory dir to write
    split: Path | None = None  # the images to use, one name a line
    model: Path | None = None  # whose encoder (default: the shipped model)
    features: Path | None = None  # feature cache (default: the capcli cache's features/)
    batch_size: int | None = None
    workers: int | None = None
    device: str = "auto"
    encoder_weights: Path | None = None  # the model's encoder weights file, if not where config.json says


def memory_job(job: MemoryJob, report: Reporter = Reporter()) -> JobResult:
    """Encode the images not yet in the feature cache, then write the memory (features, ids, captions)."""
    from capcli.data.captions import load_captions
    from capcli.data.features import FeatureCache, extract
    from capcli.devices import resolve_device
    from capcli.files import cache_dir
    from capcli.model import modeldir
    from capcli.steering.memory import Memory, image_ids

    parts = modeldir.load_model(job.model, encoder_weights=job.encoder_weights, with_lm=False)
    captions = load_captions(job.data, job.split)
    report.line(captions.report())
    encoder = parts.encoder
    cache = FeatureCache(job.features or cache_dir() / "features")
    digests, encoded, failures = extract(captions.images, encoder, cache, resolve_device(job.device), job.batch_size,
                                         job.workers, progress=report.progress(len(captions.images), "encode"))
    report.end_progress()
    for error in failures:
        report.warn(str(error))
    images = [p for p in captions.images if p in digests]
    if not images:
        raise CapcliError(f"{job.data}: no image could be encoded; nothing to remember")
    pooled = cache.load(encoder.encoder_id, [digests[p] for p in images])
    memory = Memory.from_features(encoder.encoder_id, image_ids(images, job.data),
                                  [captions.captions[p] for p in images], pooled)
    memory.save(job.out, {"model": str(parts.model_dir), "data": str(job.data),
                          "split": str(job.split) if job.split else None})
    report.line(f"memory: {len(memory)} images, {sum(map(len, memory.captions))} captions in {job.out} "
                f"({encoded} images encoded, the rest from the feature cache; {len(failures)} failed)")
    return JobResult(done=len(memory), failed=len(failures))


@dataclass(kw_only=True)
class TrainJob:
    """`capcli train`. Model options left None take their defaults, or a resumed run's own values."""

    data: Path  # data set: a folder or a captions file
    out: Path  # the model dir to write
    split: Path | None = None  # training images, one name a line
    val_split: Path | None = None  # validation images, one name a line
    features: Path | None = None  # feature cache (default: the capcli cache's features/)
    encoder: str | None = None  # default efficientnet-lite0
    encoder_weights: Path | None = None  # weights file (recorded in config.json)
    lm: str | None = None  # default smollm2-135m
    prefix_length: int | None = None  # default 10
    hidden_size: int | None = None  # default 1024
    prompt: str | None = None  # text between the prefix and the caption; default none
    grounding: GroundingConfig | None = None  # labels in the prompt (a new run only)
    settings: dict = field(default_factory=dict)  # TrainSettings fields given; the rest: defaults or the run's
    resume: bool = False  # continue the run in `out` from its checkpoint
    device: str = "auto"
    detector: str | None = None  # object detector whose objects ground the captions (a new grounded run only)


RESUME_CHANGES = ("epochs", "max_steps")  # what a resumed run may change: its length


def train_job(job: TrainJob, report: Reporter = Reporter()) -> dict:
    """Train a mapper (extracting missing features first); returns the last epoch's record."""
    from capcli.data.captions import load_captions
    from capcli.data.features import FeatureCache
    from capcli.data.shards import launched_rank
    from capcli.files import cache_dir
    from capcli.steering.detector import load_detector
    from capcli.training.train import TrainRun, fit

    if launched_rank()[0] > 0:
        report = Reporter()  # under torchrun / accelerate launch, only the main process speaks
    device = _train_device(job.device)
    train_set = load_captions(job.data, job.split)
    val_set = load_captions(job.data, job.val_split) if job.val_split else None
    report.line(f"train: {train_set.report()}")
    if val_set:
        report.line(f"val: {val_set.report()}")
    config, settings, checkpoint, parts = _train_model(job, report)
    cache = FeatureCache(job.features or cache_dir() / "features")
    detector = load_detector(config.detector, log=report.line) if config.detector else None
    init = parts if settings.init and checkpoint is None else None
    run = TrainRun(job.out, config, train_set, val_set, cache, parts.encoder, parts.lm, device, settings, checkpoint,
                   detector, init)
    record = fit(run, report)
    report.end_progress()
    report.line(f"model saved in {job.out}" + (f" (val loss {record['val_loss']:.3f})" if "val_loss" in record else ""))
    return record


def _train_device(name: str):
    from capcli.data.shards import launched_rank
    from capcli.devices import resolve_device

    if launched_rank()[1] > 1 and name not in ("auto", "cpu", "cuda"):
        raise CapcliError(f"--device {name}: launched processes each use their own GPU (LOCAL_RANK); "
                          f"use --device auto, cuda or cpu")
    return resolve_device(name)


def _train_model(job: TrainJob, report: Reporter):
    """The model config, settings, checkpoint and parts (encoder, LM, --init's mapper weights) of a new or
    resumed run."""
    from capcli.config import TrainSettings
    from capcli.model import modeldir

    if job.resume:
        return _resumed_model(job, report)
    if (job.out / modeldir.CHECKPOINT_FILE).exists():
        raise CapcliError(f"{job.out} already holds a training run: pass --resume to continue it, or choose "
                          f"a new --out")
    settings = TrainSettings(**job.settings)
    if settings.objective == "cider":
        init = _tuned_model(job, settings, report)
        return init.config, settings, None, init
    _refuse_tuning_options(settings)
    init = (modeldir.load_model(settings.init, encoder_weights=job.encoder_weights, log=report.line)
            if settings.init else None)
    if init is not None:
        for name in ("encoder", "lm"):
            if getattr(job, name) not in (None, getattr(init.config, name)):
                raise CapcliError(f"--{name} {getattr(job, name)}: the mapper of --init {settings.init} was trained "
                                  f"with {getattr(init.config, name)}; drop --{name}, or train without --init")
        return _new_config(job, init.encoder, init.lm, init.config.lm), settings, None, init
    parts = _new_parts(job, report)
    return _new_config(job, parts.encoder, parts.lm, job.lm or DEFAULT_LM), settings, None, parts


def _new_parts(job: TrainJob, report: Reporter):
    """The encoder and LM of a run from scratch, as model parts without a model dir or mapper weights."""
    from capcli.model.encoders import load_encoder
    from capcli.model.lm import load_lm
    from capcli.model.modeldir import ModelParts

    encoder = load_encoder(job.encoder or DEFAULT_ENCODER, job.encoder_weights)
    return ModelParts(job.out, None, None, encoder, load_lm(job.lm or DEFAULT_LM, log=report.line))


def _refuse_tuning_options(settings) -> None:
    if settings.xent_weight:
        raise CapcliError("--xent-weight mixes cross-entropy into --objective cider; cross-entropy training "
                          "needs no weight: drop it")
    if settings.object_penalty:
        raise CapcliError("--object-penalty changes the reward of --objective cider; cross-entropy training "
                          "has no reward: drop it")
    if settings.tune_labels != "classifier":
        raise CapcliError("--tune-labels chooses the labels of --objective cider; cross-entropy training of a "
                          "--grounded model always names the captions' own nouns: drop it")


def _resumed_model(job: TrainJob, report: Reporter):
    from capcli.config import TrainSettings
    from capcli.model import modeldir

    checkpoint_path = job.out / modeldir.CHECKPOINT_FILE
    if not checkpoint_path.is_file():
        raise CapcliError(f"{job.out}: nothing to resume (no {modeldir.CHECKPOINT_FILE}); run without --resume")
    parts = modeldir.load_model(job.out, encoder_weights=job.encoder_weights, log=report.line)
    checkpoint = modeldir.load_checkpoint(checkpoint_path)
    settings = TrainSettings(**checkpoint["settings"])
    _refuse_conflicts(job, parts.config, settings)
    settings = dataclasses.replace(settings, **{k: job.settings[k] for k in RESUME_CHANGES if k in job.settings})
    report.line(f"resuming {job.out}: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(settings).items()))
    return parts.config, settings, checkpoint, parts


MODEL_OPTIONS = ("encoder", "lm", "prefix_length", "hidden_size", "prompt", "grounding", "detector")


def _tuned_model(job: TrainJob, settings, report: Reporter):
    """A self-critical run fine-tunes the model of --init: its parts, config (and decoding) included."""
    from capcli.model import modeldir
    if not settings.init:
        raise CapcliError("--objective cider fine-tunes a trained model: give it with --init MODEL_DIR")
    given = [k for k in MODEL_OPTIONS if getattr(job, k) is not None]
    if given:
        raise CapcliError(f"--{given[0].replace('_', '-')}: --objective cider keeps the model of --init; drop it")
    init = modeldir.load_model(settings.init, encoder_weights=job.encoder_weights, log=report.line)
    if settings.tune_labels == "captions" and init.config.grounding is None:
        raise CapcliError(f"--tune-labels captions: the model in {init.model_dir} is not grounded (it reads no "
                          f"labels); drop it")
    return init


def _new_config(job: TrainJob, encoder, lm, lm_name: str) -> ModelConfig:
    return ModelConfig(
        encoder=encoder.name, encoder_id=encoder.encoder_id, feature_dim=encoder.feature_dim,
        num_tokens=encoder.num_tokens, lm=lm_name, lm_id=lm.lm_id, lm_width=lm.width,
        prefix_length=job.prefix_length or 10, hidden_size=job.hidden_size or 1024, prompt=job.prompt or "",
        grounding=job.grounding, detector=job.detector,
        encoder_weights=str(Path(job.encoder_weights).resolve()) if job.encoder_weights else None,
        generation=dict(TRAINED_DECODING))


def _refuse_conflicts(job: TrainJob, config: ModelConfig, settings) -> None:
    """A resumed run keeps its own model and settings: an option given with --resume that says otherwise is
    refused (except --epochs and --max-steps, which lengthen or shorten the run)."""
    given = {**{k: getattr(job, k) for k in MODEL_OPTIONS if getattr(job, k) is not None},
             **{k: v for k, v in job.settings.items() if k not in RESUME_CHANGES}}
    for name, value in given.items():
        own = getattr(config, name) if hasattr(config, name) else getattr(settings, name)
        if value != own:
            option = "--" + name.replace("_", "-")
            raise CapcliError(f"{option} {value!r} conflicts with the run in {job.out} ({own!r}); drop it to resume, "
                              f"or start a new run")


@dataclass(kw_only=True)
class CaptionJob:
    """`capcli caption`: which images, which model, how to decode, and where the captions go."""

    paths: list[str]  # images, folders, globs, or "-" for paths on stdin
    model: Path | None = None  # model dir (default: the shipped one)
    recursive: bool = False  # walk folders recursively
    format: str = "text"  # text, jsonl or csv
    output: Path | None = None  # file to write (default: the stream given to caption_job)
    resume: bool = False  # with output: skip images already in it, and append
    sidecar: str | None = None  # write each caption beside its image with this suffix (".txt"; ".xmp": XMP)
    existing: str = "skip"  # captions already there: skip the image, overwrite, or append/prepend (text sidecars)
    decoding: dict = field(default_factory=dict)  # DecodingSettings' fields by name; None: the model's default
    prompt: str | None = None  # replaces the model's prompt
    labels: bool = False  # also output the nouns the encoder's classifier sees and the detector's objects
    shard: str | None = None  # "I/N": take part I of N of the inputs
    batch_size: int | None = None
    workers: int | None = None
    device: str = "auto"
    encoder_weights: Path | None = None
    embed: bool = False  # also write the caption into each image file's metadata (XMP, EXIF), with exiftool
    sidecar_dir: Path | None = None  # write sidecars under this folder, mirroring the inputs' folders
    caption_prefix: str = ""  # text put before every caption (a trigger word: "photo of sks, ")
    caption_suffix: str = ""  # text put after every caption
    join: str = ", "  # with existing append/prepend: between the old text and the new caption
    memories: list[Path] = field(default_factory=list)  # memory dirs whose captions pick among candidates
    memory_mode: str = "replace"  # the memories replace the model's own, or are added to it
    explain: bool = False  # JSONL records list the neighbours that voted
    precision: str = "auto"  # autocast while captioning: see devices.autocast
    min_score: float | None = None  # labels and objects scoring less are left out of outputs (default: the model's)
    sidecar_name: str = "stem"  # sidecars replace the image's suffix (a.txt) or, "full", follow it (a.jpg.txt)


def caption_job(job: CaptionJob, report: Reporter = Reporter(), stdout: TextIO | None = None,
                stdin: TextIO | None = None) -> JobResult:
    """Caption images into the output (or `stdout`, default sys.stdout) and sidecars; `stdin` (default
    sys.stdin) lists paths for "-". Under torchrun or accelerate launch each process writes FILE.partRofN,
    and the main process merges the parts into FILE when all are done."""
    from capcli.outputs.output import part_path

    _check_caption_job(job)
    part = job_shard(job.shard)
    if part.world > 1 and job.output is None and not (job.sidecar or job.embed):
        raise CapcliError("with several launched processes, give -o FILE (each writes a part, merged at the end), "
                          "--sidecar or --embed")
    if part.world > 1 and job.format == "html":
        raise CapcliError("an HTML page cannot be merged from launched processes' parts; run one process, or "
                          "write jsonl and make the page from one process")
    keys, total, collided = _images_to_caption(job, part, stdin, report)
    output = part_path(job.output, part.rank, part.world) if part.world > 1 and job.output else job.output
    result = JobResult(failed=collided)
    with _locked_targets(job, list(keys), keys, output):  # before --resume reads (and may tidy) the output
        result.skipped, images = _skip_done(job, list(keys), keys, output)
        if not part.everything:
            report.line(f"{part.describe()}: {len(images) + result.skipped} of {total} images")
        if result.skipped:
            report.line(f"skipping {result.skipped} images already captioned")
        # Only part 0 of a sharded job writes the CSV header, so its parts concatenate into one CSV.
        header = part.index == 0 and part.rank == 0 and not (job.resume and not (_empty(output) and _empty(job.output)))
        if images:
            result.done, failed = _write_captions(job, images, keys, output, header, report, stdout or sys.stdout)
            result.failed += failed
        elif output is not None and not output.exists() and job.format != "html":
            _empty_output(job, output, header)  # a shard with no images still leaves its part, for `cat`
    if part.world > 1 and job.output is not None:
        _merge_launched_parts(job.output, part, job.resume, report)
    return result


def _check_caption_job(job: CaptionJob) -> None:
    if job.resume and job.output is None:
        raise CapcliError("--resume needs -o FILE (the file to continue)")
    if job.resume and job.format == "html":
        raise CapcliError("--resume cannot continue an HTML page; write a new one (or resume a jsonl file)")
    if job.sidecar is not None and not job.sidecar.startswith("."):
        raise CapcliError("--sidecar takes a suffix starting with a dot, e.g. --sidecar .txt")
    if job.sidecar_dir is not None and job.sidecar is None:
        raise CapcliError("--sidecar-dir needs --sidecar SUFFIX (the sidecars to write there)")
    if job.existing in ("append", "prepend") and (not _text_sidecar(job) or job.embed):
        raise CapcliError(f"--existing {job.existing} applies to text sidecars (e.g. --sidecar .txt), "
                          f"not to .xmp sidecars or --embed")
    if job.explain and job.format != "jsonl":
        raise CapcliError("--explain adds the neighbours to JSON lines records: use it with --format jsonl")
    if job.embed:
        from capcli.outputs.metadata import require_exiftool

        require_exiftool()


def _text_sidecar(job: CaptionJob) -> bool:
    return job.sidecar is not None and job.sidecar.lower() != ".xmp"


def _images_to_caption(job: CaptionJob, part: Shard, stdin, report: Reporter) -> tuple[dict[Path, str], int, int]:
    """This process's images (each once, in order) with their path relative to the folder given (for
    --shard and --sidecar-dir), how many were found in all, and how many of its images were left out because
    their sidecar would be another image's (each reported)."""
    from capcli.data.images import find_images

    found = dict(find_images(job.paths, job.recursive, stdin))  # path -> key
    if not found:
        raise CapcliError("no images found in the given paths" + ("" if job.recursive else " (use -r to walk subfolders)"))
    collided = {p: reason for p, reason in _sidecar_collisions(job, found).items() if found[p] in part}
    for image, reason in collided.items():
        report.warn(f"{image}: {reason}")
    mine = {path: key for path, key in found.items() if key in part and path not in collided}
    return mine, len(found), len(collided)


def _sidecar(job: CaptionJob, image: Path, keys: dict[Path, str]) -> Path:
    from capcli.outputs.output import sidecar_path

    return sidecar_path(image, keys[image], job.sidecar, job.sidecar_dir, job.sidecar_name == "full")


def _sidecar_collisions(job: CaptionJob, keys: dict[Path, str]) -> dict[Path, str]:
    """Images whose sidecar another image's would overwrite (a.jpg and a.png -> a.txt), each with the reason;
    found before anything is written, so that neither caption is lost."""
    if not job.sidecar:
        return {}
    by_sidecar: dict[Path, list[Path]] = {}
    for image in keys:
        by_sidecar.setdefault(Path(os.path.abspath(_sidecar(job, image, keys))), []).append(image)
    return {image: f"its sidecar {sidecar} would also be {', '.join(str(o) for o in group if o != image)}'s; "
                   f"use --sidecar-name full (a.jpg{job.sidecar}) to keep both"
            for sidecar, group in by_sidecar.items() if len(group) > 1 for image in group}


def _skip_done(job: CaptionJob, images: list[Path], keys: dict[Path, str],
               output: Path | None) -> tuple[int, list[Path]]:
    """Leave out images already in the output (--resume), and with --existing skip, those with a sidecar
    or (with --embed) a description in the file already."""
    from capcli.outputs.output import done_images

    before = len(images)
    if output is not None and job.resume:
        done = done_images(output, job.format) | (done_images(job.output, job.format) if job.output != output else set())
        images = [p for p in images if str(p) not in done]
    if job.sidecar and job.existing == "skip":
        images = [p for p in images if not _sidecar(job, p, keys).exists()]
    if job.embed and job.existing == "skip":
        from capcli.outputs.metadata import has_description

        images = [p for p in images if not has_description(p)]
    return before - len(images), images


@contextlib.contextmanager
def _locked_targets(job: CaptionJob, images: list[Path], keys: dict[Path, str], output: Path | None):
    """One writer at a time for the output file, for sidecars that are appended to, and for embedding;
    overwriting sidecars is safe with several jobs (each file is replaced whole), so it is not locked."""
    from capcli.outputs.locks import exclusive

    with contextlib.ExitStack() as stack:
        if output is not None:
            stack.enter_context(exclusive(output, "output"))
        if images and job.existing in ("append", "prepend"):
            stack.enter_context(exclusive(_common_folder(_sidecar(job, p, keys) for p in images), "sidecars"))
        if images and job.embed:
            stack.enter_context(exclusive(_common_folder(images), "images"))
        yield


def _common_folder(files) -> Path:
    """The deepest folder holding all the files: two jobs on the same folder lock the same path."""
    return Path(os.path.commonpath([os.path.abspath(f.parent) for f in files]))


def _empty(path: Path | None) -> bool:
    return path is None or not path.exists() or path.stat().st_size == 0


def _write_captions(job: CaptionJob, images: list[Path], keys: dict[Path, str], output: Path | None, header: bool,
                    report: Reporter, stdout: TextIO) -> tuple[int, int]:
    """Caption `images` into output (or stdout), sidecars and the files themselves; returns (captioned, failed)."""
    captioner = _load_captioner(job, report, objects=job.labels or bool(job.decoding.get("forbid_absent")))
    if job.explain and captioner.memory is None:
        raise CapcliError("--explain shows the memory's neighbours, but this model has no memory: give --memory DIR")
    if job.labels:
        captioner.encoder.require_head()  # before the output is opened
    if job.prompt is not None:
        captioner.model.set_prompt(job.prompt)
    settings = captioner.settings(**job.decoding)
    min_score = job.min_score if job.min_score is not None else captioner.model.config.min_score
    done = 0
    with _output_stream(output, job.resume, stdout, whole=job.format == "html") as stream:
        writer = None if ((job.sidecar or job.embed) and output is None) else _writer(job, stream, header)
        on_failure = writer.fail if writer else None
        try:
            for path, result in captioned(captioner, images, settings, job, report, job.labels, on_failure):
                captions = [job.caption_prefix + caption + job.caption_suffix for caption in result.captions]
                try:
                    labels, objects = _sure(result, min_score)
                    _write_one(job, path, keys, captions, labels, result.neighbours, writer, objects)
                except InputError as exc:  # this file could not take its caption: report it, go on
                    report.warn(str(exc))
                    if on_failure:
                        on_failure(str(exc), path)
                    continue
                done += 1
        except KeyboardInterrupt:
            if writer and job.format == "html":
                writer.close()  # a whole page of what was captioned before the stop
            raise
        if writer:
            writer.close()
    report.end_progress()
    report.line(f"captioned {done} image{'' if done == 1 else 's'}; {len(images) - done} failed")
    return done, len(images) - done


def _load_captioner(job, report: Reporter, objects: bool = False):
    """The job's model on its device, with the memories it names (after the model's own, or instead); objects:
    run the object detector for outputs too."""
    from capcli.model.pipeline import Captioner

    captioner = Captioner.load(job.model, device=job.device, encoder_weights=job.encoder_weights, log=report.line,
                               precision=job.precision, objects=objects)
    if job.memories:
        captioner.use_memories(job.memories, job.memory_mode)
    if captioner.memory is not None:
        report.line(f"memory: {len(captioner.memory)} images ({captioner.memory.source})")
    return captioner


def _empty_output(job: CaptionJob, output: Path, header: bool) -> None:
    from capcli.outputs.output import CaptionWriter

    with _output_stream(output, False, sys.stdout) as stream:
        CaptionWriter(stream, job.format, header, job.labels)


def _writer(job: CaptionJob, stream: TextIO, header: bool):
    from capcli.outputs.contactsheet import ContactSheet
    from capcli.outputs.output import CaptionWriter

    if job.format == "html":
        return ContactSheet(stream)
    return CaptionWriter(stream, job.format, header, job.labels, job.explain)


def _sure(result, min_score: float) -> tuple[list | None, list | None]:
    """The labels and objects of a result that score at least min_score: what outputs and keywords show."""
    labels = None if result.labels is None else [(n, score) for n, score in result.labels if score >= min_score]
    objects = None if result.objects is None else [d for d in result.objects if d.score >= min_score]
    return labels, objects


def _write_one(job: CaptionJob, path: Path, keys: dict[Path, str], captions: list[str], labels, neighbours,
               writer, objects=None) -> None:
    """Every output of one image: the file's own metadata first (it may refuse), then sidecar and record."""
    from capcli.outputs.metadata import embed, write_xmp_sidecar
    from capcli.outputs.output import write_text_sidecar
    from capcli.steering.grounding import OBJECT_NOUNS

    subjects = []
    if job.labels:
        nouns = [OBJECT_NOUNS.get(d.label, d.label) for d in objects or []] + [noun for noun, _ in labels or []]
        subjects = list(dict.fromkeys(nouns))
    where = None
    try:
        if job.embed:
            where = path
            embed(path, captions[0], subjects)
        if job.sidecar:
            where = _sidecar(job, path, keys)
            if _text_sidecar(job):
                write_text_sidecar(where, captions, job.existing, job.join)
            else:
                write_xmp_sidecar(where, captions[0], subjects)
        if writer:
            where = job.output or "stdout"
            writer.write(path, captions, labels, neighbours, objects)
    except OSError as exc:  # disk full, read-only folder: stop, keeping what was written
        raise CapcliError(f"cannot write {where} ({exc.strerror or exc}); the captions written "
                          f"before it are complete and kept") from None


class _output_stream:
    """The output file (appended to with --resume) or the given stream; closed quietly at the end, since
    every record was flushed as it was written. `whole`: the output is one document (an HTML page),
    gathered in memory and written to the file at once, so the file is never half-written."""

    def __init__(self, output: Path | None, resume: bool, stdout: TextIO, whole: bool = False):
        self.output, self.resume, self.stdout, self.whole, self.file = output, resume, stdout, whole, None

    def __enter__(self) -> TextIO:
        if self.output is None:
            return self.stdout
        if self.whole:
            self.file = io.StringIO()
            return self.file
        try:
            self.file = open(self.output, "a" if self.resume else "w", encoding="utf-8", newline="")
        except OSError as exc:
            raise CapcliError(f"{self.output}: cannot write ({exc.strerror})") from None
        return self.file

    def __exit__(self, *exc_info) -> None:
        if isinstance(self.file, io.StringIO):
            if self.file.getvalue():
                from capcli.files import atomic_write_text

                try:
                    atomic_write_text(self.output, self.file.getvalue())
                except OSError as exc:
                    raise CapcliError(f"{self.output}: cannot write ({exc.strerror})") from None
        elif self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass


def captioned(captioner, images: list[Path], settings, job, report: Reporter, with_labels: bool,
              on_failure=None) -> Iterator:
    """(path, Captioned) for each image that could be captioned, with progress; failures go to report.warn
    (and to on_failure, if given)."""
    advance = report.progress(len(images), "caption")
    for path, result in captioner.caption_paths(images, settings, job.batch_size, job.workers, with_labels):
        advance(1)
        if isinstance(result, InputError):
            report.warn(str(result))
            if on_failure:
                on_failure(str(result), path)
        else:
            yield path, result


def _merge_launched_parts(output: Path, part: Shard, resume: bool, report: Reporter) -> None:
    """Wait for every launched process, then the main one concatenates the parts into output."""
    import datetime

    import torch.distributed as dist

    from capcli.outputs.output import merge_parts, part_path

    dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))  # a CPU barrier, whatever the devices
    try:
        dist.barrier()
        if part.rank == 0:
            merge_parts(output, [part_path(output, rank, part.world) for rank in range(part.world)], append=resume)
            report.line(f"merged {part.world} parts into {output}")
    finally:
        dist.destroy_process_group()


@dataclass(kw_only=True)
class EvalJob:
    """`capcli eval`: caption a split and score it against its references."""

    data: Path  # data set with reference captions
    split: Path | None = None  # the images to evaluate, one name a line
    model: Path | None = None  # model dir (default: the shipped one)
    decoding: dict = field(default_factory=dict)  # DecodingSettings' fields by name; None: the model's default
    output: Path | None = None  # predictions as JSON lines
    report: Path | None = None  # an HTML report, worst captions first
    batch_size: int | None = None
    workers: int | None = None
    device: str = "auto"
    encoder_weights: Path | None = None
    memories: list[Path] = field(default_factory=list)  # as CaptionJob.memories
    memory_mode: str = "replace"
    precision: str = "auto"  # as CaptionJob.precision


def eval_job(job: EvalJob, report: Reporter = Reporter()) -> tuple[dict, JobResult]:
    """The summary (text metrics, object metrics, decoding, time) and how many images failed."""
    from capcli.data.captions import load_captions

    references = load_captions(job.data, job.split)
    report.line(references.report())
    captioner = _load_captioner(job, report, objects=bool(job.decoding.get("forbid_absent")))
    settings = captioner.settings(**job.decoding)
    with_labels = captioner.encoder.head is not None
    started = time.monotonic()
    predictions = {str(path): result for path, result in
                   captioned(captioner, references.images, settings, job, report, with_labels)}
    seconds = time.monotonic() - started
    report.end_progress()
    if not predictions:
        raise CapcliError("no image could be captioned")
    refs = {str(p): c for p, c in references.captions.items()}
    summary, rows = _score(predictions, refs, with_labels, report)
    summary = {"model": str(captioner.model_dir), "images": len(predictions),
               "failed": len(references.images) - len(predictions), **summary,
               "decoding": settings.flat(), "precision": job.precision,
               "memory": captioner.memory.source if captioner.memory is not None else None,
               "seconds": round(seconds, 1)}
    _write_eval_outputs(job, summary, rows)
    return summary, JobResult(done=len(predictions), failed=summary["failed"])


def _score(predictions: dict, refs: dict, with_labels: bool, report: Reporter) -> tuple[dict, list[dict]]:
    from capcli.outputs.evaluate import diversity, objects_by_top_label, score
    from capcli.steering.objects import object_metrics

    captions = {k: v.captions[0] for k, v in predictions.items()}
    metrics, per_image, tokenizer = score(captions, refs, warn=report.line)
    objects, per_image_objects = object_metrics(captions, refs)
    labels = {k: v.labels for k, v in predictions.items()}
    summary = {"tokenizer": tokenizer, "metrics": metrics, "objects": objects,
               "diversity": diversity(list(captions.values())),
               **(objects_by_top_label(captions, refs, labels) if with_labels else {})}
    rows = [{"image": k, "caption": v, "references": refs[k], "cider": per_image[k], **per_image_objects[k],
             **({"labels": [list(x) for x in labels[k]]} if with_labels else {})} for k, v in captions.items()]
    return summary, rows


def _write_eval_outputs(job: EvalJob, summary: dict, rows: list[dict]) -> None:
    from capcli.files import atomic_write_text
    from capcli.outputs.evaluate import write_report

    if job.output:
        atomic_write_text(job.output, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    if job.report:
        write_report(job.report, rows, summary)
