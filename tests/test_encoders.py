"""Encoders load real weights (checked by classifying a real photo), report their sizes, and fail clearly."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capcli.errors import ModelError
from capcli.model.encoders import load_encoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from baselines import timm_efficientnet_lite  # noqa: E402  (what capcli's own EfficientNet-Lite replaces)


def chelsea():
    """scikit-image's public-domain photo of Chelsea the cat."""
    import skimage

    from capcli.data.images import open_image

    return open_image(Path(skimage.__file__).parent / "data" / "chelsea.png")


def imagenet_top5(logits: torch.Tensor) -> list[str]:
    from torchvision.models import (
        ResNet50_Weights,  # carries the ImageNet class names offline
    )

    names = ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    return [names[i] for i in logits.topk(5).indices[0].tolist()]


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_efficientnet_lite_weights_recognise_a_cat(name):
    encoder = load_encoder(name)
    with torch.no_grad():
        top5 = imagenet_top5(encoder.classify(encoder(encoder.preprocess(chelsea())[None]).mean(1)))
    assert top5[0] in {"tabby", "tiger cat", "Egyptian cat"}, top5
    assert {"tabby", "tiger cat", "Egyptian cat"} <= set(top5), top5


def test_encoder_reports_pooled_and_grid_sizes():
    encoder = load_encoder("efficientnet-lite0")
    assert encoder.encoder_id == "efficientnet-lite0@57934424"
    assert (encoder.feature_dim, encoder.num_tokens) == (1280, 49)
    images = torch.stack([encoder.preprocess(chelsea())] * 2)
    with torch.no_grad():
        grid = encoder(images)
    assert grid.shape == (2, 49, 1280)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_torchvision_encoder_from_a_weights_file(tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    encoder = load_encoder("resnet18", weights=path)
    assert (encoder.feature_dim, encoder.num_tokens) == (512, 49)
    assert encoder.encoder_id.startswith("resnet18@")


def test_torchvision_encoder_without_weights_offline_says_where_to_put_them(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _offline)
    with pytest.raises(ModelError, match=r"download https://.*resnet50.* into .*checkpoints.* --encoder-weights"):
        load_encoder("resnet50")


def _offline(*args, **kwargs):
    raise OSError("network is unreachable")


def test_unknown_encoder_and_wrong_weights_are_refused(tmp_path):
    with pytest.raises(ModelError, match="unknown encoder 'vit-nonsense'"):
        load_encoder("vit-nonsense")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ModelError, match="do not fit"):
        load_encoder("resnet18", weights=wrong)


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_capcli_efficientnet_lite_gives_the_features_and_classes_of_timms_layers(name):
    """capcli/model/lite.py builds the network from its weights file with batch norms folded and static padding:
    its features and ImageNet logits must be those of timm's tf_efficientnet_liteK, to float rounding."""
    pytest.importorskip("timm")
    from torch import nn

    encoder = load_encoder(name)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
    original = timm_efficientnet_lite(name)
    assert any(type(m).__name__ == "Conv2dSame" for m in original.modules())  # TF padding, done differently
    images = torch.stack([encoder.preprocess(chelsea()), encoder.preprocess(chelsea().rotate(90))])
    with torch.no_grad():
        ours = encoder(images)
        theirs = original.forward_features(images).flatten(2).transpose(1, 2)
        our_logits, their_logits = encoder.classify(ours.mean(1)), original(images)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max())
    assert torch.allclose(our_logits, their_logits, rtol=1e-4, atol=1e-4 * their_logits.abs().max())


def test_backbone_only_lite_weights_give_features_but_no_head(tmp_path):
    from capcli.model.encoders import lite_weights_file

    full = torch.load(lite_weights_file("efficientnet-lite0"), weights_only=True)
    backbone = tmp_path / "lite0-backbone.pth"
    torch.save({k: v for k, v in full.items() if not k.startswith("_fc.")}, backbone)
    encoder, reference = load_encoder("efficientnet-lite0", weights=backbone), load_encoder("efficientnet-lite0")
    assert encoder.head is None and reference.head is not None
    images = encoder.preprocess(chelsea())[None]
    with torch.no_grad():
        assert torch.equal(encoder(images), reference(images))
    with pytest.raises(ModelError, match="no classification head"):
        encoder.require_head()


def test_weights_of_another_network_are_refused_for_efficientnet_lite(tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ModelError, match=r"resnet18.pth: not efficientnet-lite0 weights"):
        load_encoder("efficientnet-lite0", weights=path)


def test_loading_the_default_encoder_imports_no_model_library():
    """The caption path builds EfficientNet-Lite itself: timm's import alone costs most of a second."""
    code = ("import sys; from capcli.model.encoders import load_encoder; load_encoder(); "
            "print(sorted(m for m in ('timm', 'capcli.model.lite') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[0] == "['capcli.model.lite']"


def test_batch_norms_are_folded_only_where_the_output_stays_the_same():
    from torch import nn

    from capcli.model.encoders import fold_batch_norms

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    net[1].running_mean.uniform_(-1, 1), net[1].running_var.uniform_(0.5, 2), net[1].weight.data.uniform_(0.5, 2)
    net.eval()
    folded = fold_batch_norms(net, 16)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-5)

    class NormFirst(nn.Module):  # registers conv then norm, but normalises the input, not the conv's output
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(self.norm(x))

    odd = NormFirst().eval()
    odd.norm.running_mean.fill_(3.0)
    assert fold_batch_norms(odd, 16) is odd  # folding would change its output: kept as it was


def test_an_encoder_registered_by_a_plugin_module_is_found_by_name(tmp_path, monkeypatch):
    (tmp_path / "my_encoders.py").write_text(
        "from capcli.model.encoders import register_encoder\n"
        "from tiny_encoder import tiny_random_cnn\n\n"
        "@register_encoder('my-cnn')\n"
        "def my_cnn(weights=None):\n"
        "    return tiny_random_cnn(weights)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CAPCLI_PLUGINS", "tiny_encoder, my_encoders")
    grid = load_encoder("my-cnn")(torch.zeros(1, 3, 32, 32))
    assert grid.shape == (1, 16, 32)  # (B, N, D): a 4 x 4 feature map of 32 channels


def test_a_plugin_module_that_cannot_be_imported_is_named(monkeypatch):
    monkeypatch.setenv("CAPCLI_PLUGINS", "tiny_encoder,no_such_encoders")
    with pytest.raises(ModelError, match="CAPCLI_PLUGINS: cannot import 'no_such_encoders'"):
        load_encoder("tiny-random-cnn")
