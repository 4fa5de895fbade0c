"""fit(): train the prefix mapper on cached features; the encoder and the LM stay frozen.

Data-parallel under `torchrun` or `accelerate launch` (Hugging Face Accelerate sets up the process group
and the device): every process walks the same seeded order of global batches and takes every N-th row
of each, DistributedDataParallel averages the gradients, and only the main process writes files. The
loss is normalised by the global batch's token count, so N processes take the same steps as one.

A model dir holds config.json, mapper.safetensors, checkpoint.pt (optimizer, scheduler, step, RNG: for
--resume) and train_log.jsonl (one JSON object per logged step and per epoch). Every write is atomic.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from capcli.config import GenerationSettings, ModelConfig
from capcli.data import CaptionSet
from capcli.devices import autocast
from capcli.errors import CapcliError, ModelError
from capcli.features import FeatureCache, extract
from capcli.files import atomic_write_bytes
from capcli.pipeline import CONFIG_FILE, MAPPER_FILE, CaptionModel, check_matches, load_mapper_weights

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainSettings:
    epochs: int = 5
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    max_caption_tokens: int = 40
    seed: int = 0
    max_steps: int | None = None  # stop (and end the schedule) after this many steps
    checkpoint_every: int = 100  # steps
    log_every: int = 10  # steps
    sample_captions: int = 3  # per epoch, on stderr and in the log
    precision: str = "auto"  # autocast: see devices.autocast


@dataclass
class FeatureSet:
    """Cached features for a set of images, with their captions as token ids."""

    features: torch.Tensor  # (I, D) pooled or (I, N, D) grid
    pairs: list[tuple[int, list[int]]]  # (image index, caption ids)
    images: list[Path]


class Reporter:
    """Where fit() says what it is doing: a line of text (stderr) and progress over steps."""

    def line(self, text: str) -> None: ...

    def progress(self, total: int, description: str) -> Callable[[int], None]:
        return lambda n: None


def fit(out: Path, config: ModelConfig, train: CaptionSet, val: CaptionSet | None, cache: FeatureCache,
        encoder, lm, device: torch.device, settings: TrainSettings, resume: bool = False,
        report: Reporter = Reporter(), resume_changes: dict | None = None) -> dict:
    """Train, checkpointing as it goes; returns the last epoch's record.

    A resumed run keeps its checkpoint's settings except those named in resume_changes
    (epochs or max_steps, to lengthen or shorten it; the cosine schedule is stretched to the new end).
    """
    out = Path(out)
    checkpoint_path = out / CHECKPOINT_FILE
    checkpoint = None
    if resume:
        if not checkpoint_path.is_file():
            raise CapcliError(f"{out}: nothing to resume (no {CHECKPOINT_FILE}); run without --resume to start")
        config = ModelConfig.load(out / CONFIG_FILE)
        check_matches(config, encoder, lm, out)
        checkpoint = load_checkpoint(checkpoint_path)
        settings = dataclasses.replace(TrainSettings(**checkpoint["settings"]), **(resume_changes or {}))
    elif checkpoint_path.exists():
        raise CapcliError(f"{out} already holds a training run: pass --resume to continue it, or choose a new --out")

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device.type == "cpu")
    device, main, world = accelerator.device, accelerator.is_main_process, accelerator.num_processes
    if not main:
        report = Reporter()  # one voice: the main process
    torch.manual_seed(settings.seed)
    model = CaptionModel(config, lm).to(device)
    with accelerator.main_process_first():  # the main process fills the cache; the others then just read it
        train_set = _features(train, model, cache, encoder, device, settings, report, "train")
        val_set = _features(val, model, cache, encoder, device, settings, report, "val") if val else None
    config.training = {**dataclasses.asdict(settings), "train_images": len(train_set.images),
                       "train_captions": len(train_set.pairs), "data": str(train.source)}
    trainable = [p for p in model.mapper.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train_set.pairs) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    if settings.max_steps:
        total_steps = min(total_steps, settings.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(settings.warmup_steps, total_steps))
    step = 0
    if checkpoint:
        load_mapper_weights(model, checkpoint["mapper"], checkpoint_path)
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        step = checkpoint["step"]
        torch.set_rng_state(checkpoint["rng"])
        report.line(f"resuming at step {step} of {total_steps}")
    else:
        model.mapper.norm.fit(train_set.features)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / CONFIG_FILE)
    report.line(f"training a {config.mapper} mapper ({sum(p.numel() for p in trainable):,} parameters) on "
                f"{len(train_set.pairs)} captions of {len(train_set.images)} images: {settings.epochs} epochs of "
                f"{steps_per_epoch} steps, batch {settings.batch_size}, on {device}"
                + (f" x {world} processes" if world > 1 else ""))
    trained = accelerator.prepare_model(model)  # DistributedDataParallel when launched as several processes

    def save_checkpoint():
        if main:
            _save(out, model, optimizer, scheduler, step, settings)

    record: dict = {}
    started, running = time.monotonic(), []
    with _leaving_process_group(accelerator), _interrupts_save(save_checkpoint, report):
        advance = report.progress(total_steps - step, "train")
        for epoch in range(step // steps_per_epoch, settings.epochs):
            if step >= total_steps:
                break
            model.mapper.train()
            order = torch.randperm(len(train_set.pairs), generator=torch.Generator().manual_seed(settings.seed + epoch))
            for batch in range(step - epoch * steps_per_epoch, steps_per_epoch):
                if step >= total_steps:
                    break
                rows = order[batch * settings.batch_size: (batch + 1) * settings.batch_size].tolist()
                with autocast(device, settings.precision):
                    loss = _share_loss(trained, train_set, rows, accelerator.process_index, world, device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                step += 1
                running.append(accelerator.reduce(loss.detach(), "mean").item() if world > 1 else loss.item())
                advance(1)
                if step % settings.log_every == 0:
                    if main:
                        _log(out, {"step": step, "epoch": epoch + 1, "loss": sum(running) / len(running),
                                   "lr": scheduler.get_last_lr()[0],
                                   "elapsed_s": round(time.monotonic() - started, 1)})
                    running = []
                if step % settings.checkpoint_every == 0:
                    save_checkpoint()
            save_checkpoint()
            if main:
                record = _end_of_epoch(model, train_set, val_set, epoch + 1, step, settings, device, started, out,
                                       report)
            accelerator.wait_for_everyone()
    return record


@contextmanager
def _leaving_process_group(accelerator):
    """Leave the process group on the way out, interrupted or not (gloo processes abort at exit otherwise)."""
    try:
        yield
    finally:
        accelerator.end_training()


def _features(data: CaptionSet, model: CaptionModel, cache: FeatureCache, encoder, device,
              settings: TrainSettings, report: Reporter, name: str) -> FeatureSet:
    """Extract what the cache lacks, then load this set's features and tokenize its captions."""
    images = data.images
    digests, _, failures = extract(images, encoder, cache, device,
                                   progress=report.progress(len(images), f"features ({name})"))
    for path, reason in failures[:5]:
        report.line(f"skipping {path}: {reason}")
    if failures:
        report.line(f"{len(failures)} {name} images could not be read and are left out")
    kept = [p for p in images if p in digests]
    if not kept:
        raise CapcliError(f"no readable {name} images")
    grid = model.config.uses_grid
    dtype = torch.float16 if grid else torch.float32  # grids are large: keep them half size in memory
    features = cache.load(encoder.encoder_id, [digests[p] for p in kept], grid=grid, dtype=dtype)
    index = {p: i for i, p in enumerate(kept)}
    pairs = [(index[p], c) for p, c in data.pairs if p in index]
    ids = model.tokenize([c for _, c in pairs], settings.max_caption_tokens)
    return FeatureSet(features, [(i, t) for (i, _), t in zip(pairs, ids)], kept)


def _share_loss(trained, data: FeatureSet, rows: list[int], rank: int, world: int, device) -> torch.Tensor:
    """This process's part of a global batch: rows rank, rank + world, ... Its loss is divided by the global
    batch's token count and multiplied by world, so that DDP's mean of the gradients is the full batch's."""
    tokens = sum(len(data.pairs[r][1]) for r in rows)
    mine = rows[rank::world]
    weight = world
    if not mine:  # a last batch smaller than the number of processes: join the all-reduce with nothing
        mine, weight = rows[:1], 0
    features = data.features[[data.pairs[r][0] for r in mine]].to(device).float()
    return trained(features, [data.pairs[r][1] for r in mine], tokens) * weight


def _batch_loss(model: CaptionModel, data: FeatureSet, rows: list[int], device) -> torch.Tensor:
    images = [data.pairs[r][0] for r in rows]
    features = data.features[images].to(device).float()
    return model.loss(features, [data.pairs[r][1] for r in rows])


@torch.no_grad()
def _end_of_epoch(model, train_set, val_set, epoch, step, settings, device, started, out, report) -> dict:
    model.mapper.eval()
    record = {"epoch": epoch, "step": step, "elapsed_s": round(time.monotonic() - started, 1)}
    if val_set is not None:
        losses = []
        for start in range(0, len(val_set.pairs), settings.batch_size):
            rows = list(range(start, min(start + settings.batch_size, len(val_set.pairs))))
            with autocast(device):
                losses.append((_batch_loss(model, val_set, rows, device).item(), len(rows)))
        record["val_loss"] = sum(l * n for l, n in losses) / sum(n for _, n in losses)
    shown = val_set or train_set
    if settings.sample_captions:
        picks = list(range(min(settings.sample_captions, len(shown.images))))
        with autocast(device):
            captions = model.generate(shown.features[picks].to(device).float(), GenerationSettings(max_new_tokens=24))
        record["samples"] = {shown.images[i].name: c[0] for i, c in zip(picks, captions)}
    _log(out, record)
    plot_loss_curve(out)
    summary = f"epoch {epoch}: step {step}" + (f", val loss {record['val_loss']:.3f}" if "val_loss" in record else "")
    report.line(summary)
    for name, caption in record.get("samples", {}).items():
        report.line(f"  {name}: {caption}")
    return record


def plot_loss_curve(out: Path) -> None:
    """loss_curve.png beside train_log.jsonl: training loss per logged step, validation loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="training loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per caption token")
    ax.set_title(out.name)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(out / "loss_curve.png", buffer.getvalue())


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _save(out: Path, model: CaptionModel, optimizer, scheduler, step: int, settings: TrainSettings) -> None:
    from safetensors.torch import save as save_safetensors

    state = model.mapper_state()
    atomic_write_bytes(out / MAPPER_FILE, save_safetensors(state, metadata={"step": str(step)}))
    buffer = io.BytesIO()
    torch.save({"mapper": state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step, "rng": torch.get_rng_state(), "settings": dataclasses.asdict(settings)}, buffer)
    atomic_write_bytes(out / CHECKPOINT_FILE, buffer.getvalue())


def load_checkpoint(path: Path) -> dict:
    try:  # weights_only: a checkpoint can never run code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated or hostile: refuse with the reason
        raise ModelError(f"{path}: cannot load checkpoint safely ({type(exc).__name__}: {str(exc)[:200]})") from None


def _log(out: Path, record: dict) -> None:
    with open(out / LOG_FILE, "a", encoding="utf-8") as f:  # appends of one short line: whole lines only
        f.write(json.dumps(record) + "\n")


class _interrupts_save:
    """On Ctrl-C or SIGTERM: save a checkpoint, then stop (the CLI exits 130)."""

    def __init__(self, save: Callable[[], None], report: Reporter):
        self.save, self.report = save, report

    def __enter__(self):
        def raise_interrupt(signum, frame):
            raise KeyboardInterrupt
        try:
            self.previous = signal.signal(signal.SIGTERM, raise_interrupt)
        except ValueError:  # not the main thread
            self.previous = None
        return self

    def __exit__(self, kind, value, traceback):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        if kind is KeyboardInterrupt:
            self.save()
            self.report.line("interrupted: checkpoint saved; continue with --resume")
        return False
