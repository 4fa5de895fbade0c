"""The one owner of the model-dir format: what `train` writes and `caption` / `eval` read.

MODEL_DIR/
  config.json          ModelConfig: encoder (and its weights' fingerprint and file), LM, mapper sizes, prompt
  mapper.safetensors   the mapper's weights; the frozen encoder and LM are named, never saved
  checkpoint.pt        optimizer, scheduler, step and RNG state for --resume (loaded with weights_only=True)
  train_log.jsonl      one JSON object per logged step and per epoch
  loss_curve.png       training and validation loss
  memory/              optional: a retrieval memory (capcli memory build) the model captions with

Every write is atomic (a temporary file renamed into place). `load_model` is the one way in: it reads a model
dir (or a shipped model by name) and returns its parts, checked against each other, for captioning, training
from it or evaluating it.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from capcli.config import ModelConfig
from capcli.errors import ModelError
from capcli.files import atomic_write_bytes

CONFIG_FILE = "config.json"
MAPPER_FILE = "mapper.safetensors"
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.jsonl"
CURVE_FILE = "loss_curve.png"
MEMORY_DIR = "memory"


@dataclass
class ModelParts:
    """A model dir's parts: its config, its mapper's weights, and the frozen encoder and LM it names (loaded,
    and checked to be the ones it was trained with)."""

    model_dir: Path
    config: ModelConfig
    mapper_state: dict[str, torch.Tensor]
    encoder: object  # capcli.model.encoders.ImageEncoder
    lm: object | None  # capcli.model.lm.LanguageModel; None when loaded without it (with_lm=False)

    def caption_model(self, device: torch.device | str = "cpu"):
        """The CaptionModel with these weights, in eval mode on `device`."""
        from capcli.model.pipeline import CaptionModel

        model = CaptionModel(self.config, self.lm)
        self.load_mapper_into(model.mapper)
        return model.eval().to(torch.device(device))

    def load_mapper_into(self, mapper: torch.nn.Module) -> None:
        load_mapper_weights(mapper, self.mapper_state, self.model_dir / MAPPER_FILE, self.config.mapper)


def load_model(spec: Path | str | None = None, *, encoder_weights: Path | None = None, log=None,
               with_lm: bool = True) -> ModelParts:
    """Read a model dir, or a shipped model by name (None: the default), with its encoder and (unless
    with_lm=False) its LM. encoder_weights: the encoder's weights file, for a model trained with one that is no
    longer where config.json says. log hears of first-use downloads and conversions."""
    from capcli.model.encoders import load_encoder
    from capcli.model.lm import load_lm

    model_dir = resolve_model_dir(spec)
    config, state = read_model_dir(model_dir)
    encoder = load_encoder(config.encoder, _encoder_weights(config, encoder_weights))
    if config.grounding is not None and encoder.head is None:
        raise ModelError(f"{model_dir} names the objects its encoder's classifier sees, but encoder "
                         f"{encoder.encoder_id} has no classification head; use weights that include it")
    lm = load_lm(config.lm, log=log) if with_lm else None
    check_matches(config, encoder, lm, model_dir)
    return ModelParts(model_dir, config, state, encoder, lm)


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


def write_mapper(model_dir: Path, state: dict[str, torch.Tensor], step: int) -> None:
    from safetensors.torch import save as save_safetensors

    atomic_write_bytes(Path(model_dir) / MAPPER_FILE, save_safetensors(state, metadata={"step": str(step)}))


def write_checkpoint(model_dir: Path, checkpoint: dict) -> None:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(Path(model_dir) / CHECKPOINT_FILE, buffer.getvalue())


def load_checkpoint(path: Path) -> dict:
    try:  # weights_only: a checkpoint can never run code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated or hostile: refuse with the reason
        raise ModelError(f"{path}: cannot load checkpoint safely ({type(exc).__name__}: {str(exc)[:200]})") from None


def load_mapper_weights(mapper: torch.nn.Module, state: dict[str, torch.Tensor], source: Path, kind: str) -> None:
    """Load `state` into `mapper`, refusing missing, unexpected or wrong-shaped tensors by name."""
    expected = mapper.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise ModelError(f"{source}: tensor {name!r} missing (expected shape {tuple(tensor.shape)})")
        if state[name].shape != tensor.shape:
            raise ModelError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, expected "
                             f"{tuple(tensor.shape)} for the {kind} mapper in config.json")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ModelError(f"{source}: unexpected tensor {unexpected[0]!r} for the {kind} mapper")
    mapper.load_state_dict({k: v.float() for k, v in state.items()})


def check_matches(config: ModelConfig, encoder, lm, model_dir: Path) -> None:
    """Refuse an encoder (weights included) or LM other than the ones the model was trained with, naming both."""
    if encoder.encoder_id != config.encoder_id:
        raise ModelError(f"{model_dir} was trained with encoder {config.encoder_id}, but {encoder.encoder_id} was "
                         f"loaded; pass the weights it was trained with (--encoder-weights) or retrain")
    if lm is not None and lm.lm_id != config.lm_id:
        raise ModelError(f"{model_dir} was trained with language model {config.lm_id}, but {config.lm!r} gives "
                         f"{lm.lm_id}; install the LM it was trained with or retrain")


def _encoder_weights(config: ModelConfig, override: Path | None) -> Path | None:
    """The encoder weights file to load: the one given, else the file the model was trained with (recorded in
    config.json) if it is still there, else None (the packaged or hub weights)."""
    if override is not None:
        return Path(override)
    if config.encoder_weights and Path(config.encoder_weights).is_file():
        return Path(config.encoder_weights)
    return None


SHIPPED = ("default",)  # model dirs installed with capcli, usable by name: --model default


def shipped_model_dir(name: str = "default") -> Path:
    """A shipped model: weights/NAME in a source checkout, or share/capcli/weights/NAME in an install."""
    checkout = Path(__file__).resolve().parents[2]  # capcli/model/modeldir.py -> the source checkout
    for candidate in (checkout / "weights" / name, Path(sys.prefix) / "share" / "capcli" / "weights" / name):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise ModelError(f"no {name} model is installed: pass --model DIR (train one with `capcli train`)")


def resolve_model_dir(spec: Path | str | None) -> Path:
    """None: the default model; a shipped model's name (when no such folder exists here); else the path."""
    if spec is None:
        return shipped_model_dir("default")
    if not Path(spec).exists() and str(spec) in SHIPPED:
        return shipped_model_dir(str(spec))
    return Path(spec)
