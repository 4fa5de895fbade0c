"""fit(): train the prefix mapper on cached features; the encoder and the LM stay frozen.

Data-parallel under `torchrun` or `accelerate launch` (Hugging Face Accelerate sets up the process group
and the device): every process walks the same seeded order of global batches and takes every N-th row
of each, DistributedDataParallel averages the gradients, and only the main process writes files. The
loss is normalised by the global batch's token count, so N processes take the same steps as one.
The model dir's files are written through capcli.model.modeldir.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from capcli.config import GenerationSettings, GroundingConfig, ModelConfig, TrainSettings
from capcli.data.captions import CaptionSet
from capcli.data.features import FeatureCache, extract
from capcli.devices import autocast
from capcli.errors import CapcliError
from capcli.files import atomic_write_bytes
from capcli.model import modeldir
from capcli.model.pipeline import CaptionModel
from capcli.reporting import Reporter, interrupts_deferred, sigterm_interrupts
from capcli.steering.grounding import classifier_labels, machine_example, training_example
from capcli.training.scst import SelfCritical


@dataclass
class TrainRun:
    """Everything fit() needs: what to train, on what, where to write it, and how."""

    out: Path  # the model dir to write
    config: ModelConfig  # the model to build (a resumed run's own)
    train: CaptionSet  # training images and captions
    val: CaptionSet | None  # validation images and captions, for the loss and samples each epoch
    cache: FeatureCache  # where the features are (what is missing is extracted first)
    encoder: object  # the frozen ImageEncoder the features come from
    lm: object  # the frozen LanguageModel
    device: torch.device  # this process's device (launched processes: their own GPU)
    settings: TrainSettings
    checkpoint: dict | None = None  # the checkpoint to resume from
    detector: object | None = None  # the object detector of a model that reads objects (capcli.steering.detector)
    init: modeldir.ModelParts | None = None  # the model whose mapper weights a new run starts from


@dataclass
class FeatureSet:
    """Cached features for a set of images, with their captions as token ids."""

    features: torch.Tensor  # (I, D) pooled
    pairs: list[tuple[int, list[int]]]  # (image index, caption ids)
    images: list[Path]
    texts: list[str]  # the caption of each pair, for grounded training
    labels: list[list[str]] | None = None  # per image, the labels captioning tells (grounded models)

    @functools.cached_property
    def rows_per_image(self) -> list[list[int]]:
        """Each image's rows of `pairs`, in the order of `images`."""
        rows: list[list[int]] = [[] for _ in self.images]
        for row, (image, _) in enumerate(self.pairs):
            rows[image].append(row)
        return rows

    def captions_per_image(self) -> list[list[str]]:
        """Each image's captions, in the order of `images`."""
        return [[self.texts[row] for row in rows] for rows in self.rows_per_image]


@dataclass
class _State:
    """The moving parts of a run: model, data, optimizer, schedule and position."""

    model: CaptionModel
    train_set: FeatureSet
    val_set: FeatureSet | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    critic: SelfCritical | None = None  # the "cider" objective's reward and loss


def fit(run: TrainRun, report: Reporter = Reporter()) -> dict:
    """Train, checkpointing as it goes; returns the last epoch's record. Ctrl-C or SIGTERM saves a checkpoint
    and re-raises KeyboardInterrupt."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=run.device.type == "cpu", device_placement=False)
    device = accelerator.device if accelerator.num_processes > 1 else run.device
    state = _prepare(run, accelerator, device, report)
    main, world = accelerator.is_main_process, accelerator.num_processes
    trainable = [p for p in state.model.mapper.parameters() if p.requires_grad]
    report.line(f"training a {run.config.mapper} mapper ({sum(p.numel() for p in trainable):,} parameters) on "
                f"{len(state.train_set.pairs)} captions of {len(state.train_set.images)} images: "
                f"{run.settings.epochs} epochs of {state.steps_per_epoch} steps, batch {run.settings.batch_size}"
                + (f" images x {run.settings.samples} sampled captions, self-critical"
                   if run.settings.objective == "cider" else "") + ", "
                f"on {device}" + (f" x {world} processes" if world > 1 else ""))
    trained = accelerator.prepare_model(state.model)  # DistributedDataParallel when launched as several processes

    def save():
        if main:
            with interrupts_deferred():
                _save(run.out, state, run.settings)

    record: dict = {}
    started = time.monotonic()
    with _leaving_process_group(accelerator), sigterm_interrupts(), _saving_when_interrupted(save, report):
        advance = report.progress(state.total_steps - state.step, "train")
        for epoch in range(state.step // state.steps_per_epoch, run.settings.epochs):
            if state.step >= state.total_steps:
                break
            _train_epoch(trained, state, epoch, run, accelerator, device, advance, save, started)
            save()
            if main:
                record = _end_of_epoch(state.model, state.train_set, state.val_set, epoch + 1, state.step,
                                       run.settings, device, started, run.out, report)
            accelerator.wait_for_everyone()
    return record


def _prepare(run: TrainRun, accelerator, device, report: Reporter) -> _State:
    """Build the model, load the features, and start the optimizer and schedule (from the checkpoint if any)."""
    settings = run.settings
    torch.manual_seed(settings.seed)
    model = CaptionModel(run.config, run.lm).to(device)
    with accelerator.main_process_first():  # the main process fills the cache; the others then just read it
        train_set = _features(run.train, model, run, device, report, "train")
        val_set = _features(run.val, model, run, device, report, "val") if run.val else None
    run.config.training = {**dataclasses.asdict(settings), "train_images": len(train_set.images),
                           "train_captions": len(train_set.pairs), "data": str(run.train.source)}
    trainable = [p for p in model.mapper.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(_units(train_set, settings) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    if settings.max_steps:
        total_steps = min(total_steps, settings.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(settings.warmup_steps, total_steps))
    state = _State(model, train_set, val_set, optimizer, scheduler, steps_per_epoch, total_steps,
                   critic=_critic(train_set, settings))
    if run.checkpoint:
        modeldir.load_mapper_weights(model.mapper, run.checkpoint["mapper"], run.out / modeldir.CHECKPOINT_FILE,
                                     run.config.mapper)
        optimizer.load_state_dict(run.checkpoint["optimizer"])
        scheduler.load_state_dict(run.checkpoint["scheduler"])
        state.step = run.checkpoint["step"]
        torch.set_rng_state(run.checkpoint["rng"])
        report.line(f"resuming at step {state.step} of {total_steps}")
    elif run.init is not None:
        run.init.load_mapper_into(model.mapper)
        report.line(f"starting from the mapper of {run.init.model_dir}")
    else:
        model.mapper.norm.fit(train_set.features)
    if accelerator.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        run.config.save(run.out / modeldir.CONFIG_FILE)
    return state


def _units(data: FeatureSet, settings: TrainSettings) -> int:
    """What a step's batch counts: captions, or images for the "cider" objective."""
    return len(data.images) if settings.objective == "cider" else len(data.pairs)


def _train_epoch(trained, state: _State, epoch: int, run: TrainRun, accelerator, device, advance, save,
                 started: float) -> None:
    settings, world = run.settings, accelerator.num_processes
    state.model.mapper.train()
    order = torch.randperm(_units(state.train_set, settings),
                           generator=torch.Generator().manual_seed(settings.seed + epoch))
    trainable = [p for p in state.model.mapper.parameters() if p.requires_grad]
    critic = state.critic
    running, rewards = [], []
    for batch in range(state.step - epoch * state.steps_per_epoch, state.steps_per_epoch):
        if state.step >= state.total_steps:
            break
        rows = order[batch * settings.batch_size: (batch + 1) * settings.batch_size].tolist()
        with autocast(device, settings.precision):
            if critic is None:
                loss = _share_loss(trained, state.model, state.train_set, rows, accelerator.process_index, world,
                                   device, state.step, settings)
            else:
                loss, reward = _share_critic_loss(critic, trained, state.model, state.train_set, rows,
                                                  accelerator.process_index, world, device, state.step, settings)
                rewards.append(accelerator.reduce(reward.to(device), "mean").item() if world > 1 else reward.item())
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        state.optimizer.step()
        state.scheduler.step()
        state.step += 1
        running.append(accelerator.reduce(loss.detach(), "mean").item() if world > 1 else loss.item())
        advance(1)
        if state.step % settings.log_every == 0:
            if accelerator.is_main_process:
                _log(run.out, {"step": state.step, "epoch": epoch + 1, "loss": sum(running) / len(running),
                               **({"reward": sum(rewards) / len(rewards)} if rewards else {}),
                               "lr": state.scheduler.get_last_lr()[0],
                               "elapsed_s": round(time.monotonic() - started, 1)})
            running, rewards = [], []
        if state.step % settings.checkpoint_every == 0:
            save()


@contextmanager
def _leaving_process_group(accelerator):
    """Leave the process group on the way out, interrupted or not (gloo processes abort at exit otherwise)."""
    try:
        yield
    finally:
        accelerator.end_training()


@contextmanager
def _saving_when_interrupted(save, report: Reporter):
    try:
        yield
    except KeyboardInterrupt:
        save()
        report.line("interrupted: checkpoint saved; continue with --resume")
        raise


def _features(data: CaptionSet, model: CaptionModel, run: TrainRun, device, report: Reporter,
              name: str) -> FeatureSet:
    """Extract what the cache lacks, then load this set's features and tokenize its captions."""
    images = data.images
    digests, _, failures = extract(images, run.encoder, run.cache, device,
                                   progress=report.progress(len(images), f"features ({name})"), detector=run.detector)
    for error in failures:
        report.warn(f"{error}: left out")
    kept = [p for p in images if p in digests]
    if not kept:
        raise CapcliError(f"no readable {name} images")
    features = run.cache.load(run.encoder.encoder_id, [digests[p] for p in kept])
    index = {p: i for i, p in enumerate(kept)}
    pairs = [(index[p], c) for p, c in data.pairs if p in index]
    ids = model.tokenize([c for _, c in pairs], run.settings.max_caption_tokens)
    labels = None
    if model.config.grounding is not None:
        objects = (run.cache.objects(run.detector.detector_id, [digests[p] for p in kept])
                   if run.detector is not None else None)
        labels = classifier_labels(run.encoder, features, model.config.grounding, objects)
    return FeatureSet(features, [(i, t) for (i, _), t in zip(pairs, ids)], kept, [c for _, c in pairs], labels)


def _inputs(model: CaptionModel, data: FeatureSet, rows: list[int], step: int | None,
            settings: TrainSettings) -> tuple[list[list[int]], list[list[int]] | None]:
    """Caption ids and context ids for these rows. Grounded training draws each row's labels from a generator
    seeded by (seed, step, row): the same in any number of processes and after --resume. step None
    (validation) names the classifier's labels, as captioning does."""
    grounding = model.config.grounding
    if grounding is None:
        return [data.pairs[r][1] for r in rows], None
    if step is None:
        labels = [data.labels[data.pairs[r][0]] for r in rows]
        return [data.pairs[r][1] for r in rows], model.context_ids(labels, len(rows))
    examples = [_example(data, r, grounding, random.Random(f"{settings.seed}:{step}:{r}")) for r in rows]
    ids = model.tokenize([caption for _, caption in examples], settings.max_caption_tokens)
    return ids, model.context_ids([labels for labels, _ in examples], len(rows))


def _example(data: FeatureSet, row: int, grounding: GroundingConfig, rng: random.Random) -> tuple[list[str], str]:
    """(labels, caption) for one training row, by the grounding's train_labels."""
    machine = grounding.train_labels == "machine" or (grounding.train_labels == "mix" and rng.random() < 0.5)
    if machine:
        return machine_example(data.labels[data.pairs[row][0]], grounding, rng), data.texts[row]
    return training_example(data.texts[row], grounding, rng)


def _share_loss(trained, model: CaptionModel, data: FeatureSet, rows: list[int], rank: int, world: int, device,
                step: int, settings: TrainSettings) -> torch.Tensor:
    """This process's part of a global batch: rows rank, rank + world, ... Its loss is divided by the global
    batch's token count and multiplied by world, so that DDP's mean of the gradients is the full batch's."""
    ids, context = _inputs(model, data, rows, step, settings)
    tokens = sum(len(i) for i in ids)
    mine = list(range(len(rows)))[rank::world]
    weight = world
    if not mine:  # a last batch smaller than the number of processes: join the all-reduce with nothing
        mine, weight = [0], 0
    features = data.features[[data.pairs[rows[i]][0] for i in mine]].to(device).float()
    return trained(features, [ids[i] for i in mine], tokens, context and [context[i] for i in mine]) * weight


def _critic(data: FeatureSet, settings: TrainSettings) -> SelfCritical | None:
    """The self-critical objective's reward and loss, with each training image's references."""
    if settings.objective != "cider":
        return None
    return SelfCritical(data.captions_per_image(), settings.samples, settings.object_penalty)


def _share_critic_loss(critic: SelfCritical, trained, model: CaptionModel, data: FeatureSet, images: list[int],
                       rank: int, world: int, device, step: int,
                       settings: TrainSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's images of a global batch (rank, rank + world, ...), scaled as _share_loss does: the
    loss is divided by the global batch's number of samples. Returns it with the mean reward of its samples.
    With a cross-entropy weight, each image also brings one of its captions, drawn from a generator seeded by
    (seed, step, image). With
    tune_labels "captions", a grounded model's labels are that drawn caption's nouns instead of the classifier's."""
    mine = images[rank::world]
    weight = world
    if not mine:  # fewer images than processes: join the all-reduce with nothing
        mine, weight = images[:1], 0
    features = data.features[mine].to(device).float()
    labels = [data.labels[i] for i in mine] if data.labels is not None else None
    drawn = [random.Random(f"{settings.seed}:{step}:{i}:reference").choice(data.rows_per_image[i]) for i in mine]
    references = [data.pairs[row][1] for row in drawn] if settings.xent_weight else None
    grounding = model.config.grounding
    if grounding is not None and settings.tune_labels == "captions":  # the drawn caption's nouns, none swapped
        unswapped = dataclasses.replace(grounding, swap=0.0)
        labels = [training_example(data.texts[row], unswapped, random.Random(f"{settings.seed}:{step}:{row}"))[0]
                  for row in drawn]
    loss, rewards = critic.loss(trained, model, features, mine, labels, len(images) * critic.samples,
                                references, settings.xent_weight)
    return loss * weight, rewards.mean()


def _batch_loss(model: CaptionModel, data: FeatureSet, rows: list[int], device, settings: TrainSettings) -> torch.Tensor:
    features = data.features[[data.pairs[r][0] for r in rows]].to(device).float()
    ids, context = _inputs(model, data, rows, None, settings)
    return model.loss(features, ids, None, context)


@torch.no_grad()
def _end_of_epoch(model, train_set, val_set, epoch, step, settings, device, started, out, report) -> dict:
    model.mapper.eval()
    record = {"epoch": epoch, "step": step, "elapsed_s": round(time.monotonic() - started, 1)}
    if val_set is not None:
        losses = []
        for start in range(0, len(val_set.pairs), settings.batch_size):
            rows = list(range(start, min(start + settings.batch_size, len(val_set.pairs))))
            with autocast(device):
                losses.append((_batch_loss(model, val_set, rows, device, settings).item(), len(rows)))
        record["val_loss"] = sum(l * n for l, n in losses) / sum(n for _, n in losses)
    shown = val_set or train_set
    if settings.sample_captions:
        picks = list(range(min(settings.sample_captions, len(shown.images))))
        with autocast(device):
            labels = [shown.labels[i] for i in picks] if shown.labels is not None else None
            captions = model.generate(shown.features[picks].to(device).float(), GenerationSettings(max_new_tokens=24),
                                      labels)
        record["samples"] = {shown.images[i].name: c[0] for i, c in zip(picks, captions)}
    with interrupts_deferred():
        _log(out, record)
        plot_loss_curve(out)
    summary = f"epoch {epoch}: step {step}" + (f", val loss {record['val_loss']:.3f}" if "val_loss" in record else "")
    report.line(summary)
    for name, caption in record.get("samples", {}).items():
        report.line(f"  {name}: {caption}")
    return record


def plot_loss_curve(out: Path) -> None:
    """loss_curve.png beside train_log.jsonl: training loss per logged step, validation loss per epoch, and for
    self-critical runs the samples' mean reward."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (out / modeldir.LOG_FILE).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    reward = [(r["step"], r["reward"]) for r in records if "reward" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="training loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("advantage-weighted cross-entropy per sample" if reward else "cross-entropy per caption token")
    ax.set_title(out.name)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend(loc="upper left")
    if reward:
        right = ax.twinx()
        right.plot(*zip(*reward), color="tab:green", linewidth=1, label="mean reward (CIDEr-D of the samples)")
        right.set_ylabel("reward")
        right.legend(loc="upper right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(out / modeldir.CURVE_FILE, buffer.getvalue())


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _save(out: Path, state: _State, settings: TrainSettings) -> None:
    weights = state.model.mapper_state()
    modeldir.write_mapper(out, weights, state.step)
    modeldir.write_checkpoint(out, {"mapper": weights, "optimizer": state.optimizer.state_dict(),
                                    "scheduler": state.scheduler.state_dict(), "step": state.step,
                                    "rng": torch.get_rng_state(), "settings": dataclasses.asdict(settings)})


def _log(out: Path, record: dict) -> None:
    with open(out / modeldir.LOG_FILE, "a", encoding="utf-8") as f:  # appends of one short line: whole lines only
        f.write(json.dumps(record) + "\n")
