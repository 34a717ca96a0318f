"""Model registry. Every model is a `Net`: features -> (optional global pooling) -> one linear classifier,
so that CAM (Eq. 1) is the classifier's weights applied to the last feature maps for any architecture."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torchvision

from nrrdd import NrrddError
from nrrdd.data import normalize


_REGISTRY: dict[str, Callable[..., "Net"]] = {}
_UNLISTED: set[str] = set()  # built from checkpoints only, never an --arch to train


def register(name: str, listed: bool = True):
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' registered twice")
        _REGISTRY[name] = fn
        if not listed:
            _UNLISTED.add(name)
        return fn
    return deco


def model_names() -> list[str]:
    """The architectures a teacher or student can be trained as."""
    return sorted(set(_REGISTRY) - _UNLISTED)


def batch_size_for(x: torch.Tensor, at_32px: int) -> int:
    """Images per inference pass: `at_32px` at 32x32 and proportionally fewer at larger sides, so activation
    memory is the same at any resolution (512 images at 224 px would hold gigabytes of activations)."""
    return max(1, at_32px * 1024 // (x.shape[-2] * x.shape[-1]))


def create_model(name: str, num_classes: int, image_size: int = 32, channels: int = 3, **kw) -> "Net":
    if name not in _REGISTRY:
        raise NrrddError(f"unknown model '{name}'; registered models: {', '.join(model_names())}")
    return _REGISTRY[name](num_classes=num_classes, image_size=image_size, channels=channels, **kw)


class Net(nn.Module):
    """features (B, K, h, w) -> pool -> classifier. `pooled=False` means a linear head on the flattened map.
    A net carries the per-channel `mean` and `std` of the data it was trained on (as timm's pretrained configs
    do), so whoever feeds it images asks the net, not a pair of arguments travelling beside it."""

    def __init__(self, features: nn.Module, classifier: nn.Linear, pooled: bool, dropout: float = 0.0):
        super().__init__()
        self.features, self.classifier, self.pooled = features, classifier, pooled
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None

    def set_stats(self, mean, std) -> "Net":
        self.mean, self.std = tuple(mean), tuple(std)
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) images -> this net's input scale."""
        if self.mean is None:
            raise ValueError("this net has no input statistics: call set_stats(mean, std) first")
        return normalize(x, self.mean, self.std)

    def embed(self, f: torch.Tensor) -> torch.Tensor:
        return (f.mean(dim=(2, 3)) if self.pooled else f.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.embed(self.features(x))))

    def cam_weights(self, feature_shape: torch.Size) -> torch.Tensor:
        """(num_classes, K, h, w) weights with logit_y = sum(W[y] * F) (+ bias): Eq. 1 for either head."""
        k, h, w = feature_shape[-3:]
        W = self.classifier.weight
        return W.view(-1, k, h, w) if not self.pooled else (W / (h * w)).view(-1, k, 1, 1)


# ---------------------------------------------------------------- ConvNet-D (DC/RDED family)

def _norm(kind: str, width: int, size: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(width)
    if kind == "instance":
        return nn.GroupNorm(width, width, affine=True)  # instance norm with affine, as in the DC benchmark
    if kind == "none":
        return nn.Identity()
    raise NrrddError(f"unknown norm '{kind}' (batch, instance, none)")


def convnet(depth: int, num_classes: int, image_size: int, channels: int, width: int = 128,
            norm: str = "batch") -> Net:
    if image_size % (2 ** depth):
        raise NrrddError(f"convnet{depth} needs an image size divisible by {2 ** depth}, got {image_size}")
    layers, c = [], channels
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), _norm(norm, width, image_size), nn.ReLU(inplace=True),
                   nn.AvgPool2d(2)]
        c = width
    side = image_size // 2 ** depth
    return Net(nn.Sequential(*layers), nn.Linear(width * side * side, num_classes), pooled=False)


for _d in (3, 4, 5, 6):
    register(f"convnet{_d}")(lambda _d=_d, **kw: convnet(_d, **kw))


@register("convnet")
def convnet_auto(num_classes, image_size, channels, **kw):
    """ConvNet whose depth suits the resolution (the DC convention): 32 -> 3, 64 -> 4, 128 -> 5, 256 -> 6."""
    depth = {32: 3, 64: 4, 128: 5, 256: 6}.get(image_size)
    if depth is None:
        raise NrrddError(f"convnet: no standard depth for {image_size} px; name convnet3..convnet6 explicitly")
    return convnet(depth, num_classes, image_size, channels, **kw)


# ---------------------------------------------------------------- ResNets and torchvision models

def _resnet(arch: str, num_classes: int, channels: int, cifar: bool) -> Net:
    m = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if cifar:  # the "modified" ResNet of RDED/SRe2L: 3x3 stride-1 stem, no max-pool
        m.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
        m.maxpool = nn.Identity()
    elif channels != 3:
        m.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    return wrap_resnet(m)


def wrap_resnet(m: nn.Module) -> Net:
    """A torchvision ResNet as a Net, sharing its modules (and so its weights)."""
    feats = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
    return Net(feats, m.fc, pooled=True)


for _arch in ("resnet18", "resnet50", "resnet101"):
    # CIFAR-style (3x3 stem, no max-pool) for inputs up to 64 px, ImageNet-style (7x7 stem, max-pool) above;
    # <arch>_imagenet always ImageNet-style (a pretrained checkpoint at any resolution)
    register(_arch)(lambda num_classes, image_size, channels, _arch=_arch, **_:
                    _resnet(_arch, num_classes, channels, cifar=image_size <= 64))
    register(f"{_arch}_imagenet")(lambda num_classes, image_size, channels, _arch=_arch, **_:
                                  _resnet(_arch, num_classes, channels, cifar=False))


def wrap_torchvision_features(m: nn.Module) -> Net:
    """MobileNet / EfficientNet as a Net: `features`, then the last layer of `classifier` (Dropout + Linear)."""
    return Net(m.features, m.classifier[-1], pooled=True, dropout=m.classifier[0].p)


def _torchvision_net(m: nn.Module, channels: int) -> Net:
    stem = m.features[0][0]  # the stem conv
    if channels != stem.in_channels:
        m.features[0][0] = nn.Conv2d(channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding,
                                     bias=False)
    return wrap_torchvision_features(m)


@register("mobilenet_v2")
def mobilenet_v2(num_classes, image_size, channels, **_):
    return _torchvision_net(torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes), channels)


@register("efficientnet_b0")
def efficientnet_b0(num_classes, image_size, channels, **_):
    return _torchvision_net(torchvision.models.efficientnet_b0(weights=None, num_classes=num_classes), channels)


# torchvision architectures whose standard (ImageNet) checkpoints `nrrdd import-teacher` reads: name -> wrapper
TORCHVISION = {"resnet18": wrap_resnet, "resnet50": wrap_resnet, "resnet101": wrap_resnet,
               "mobilenet_v2": wrap_torchvision_features, "efficientnet_b0": wrap_torchvision_features}


# ---------------------------------------------------------------- teacher ensembles (EDC averages several)

class _SideBySide(nn.Module):
    """The members' feature maps stacked along channels, so that one linear head over them can be the mean of
    the members' heads."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.members], 1)


def merge_nets(nets: list[Net]) -> Net:
    """One Net whose logits are the mean of the members' logits, and so whose CAM (Eq. 1) is the mean of their
    CAMs and whose BatchNorm layers are all of theirs: every stage takes an ensemble as it takes one teacher.
    The members must share the head's kind and the feature maps' side (checked on the first forward)."""
    if len({n.pooled for n in nets}) > 1:
        raise NrrddError("an ensemble's members must all pool their feature maps or all flatten them")
    heads = [n.classifier for n in nets]
    head = nn.Linear(sum(h.in_features for h in heads), heads[0].out_features)
    with torch.no_grad():
        # flattened (K, h, w) maps are channel-major, so member blocks of the stacked map stay contiguous
        head.weight.copy_(torch.cat([h.weight for h in heads], 1) / len(nets))
        head.bias.copy_(torch.stack([h.bias for h in heads]).mean(0))
    return Net(_SideBySide([n.features for n in nets]), head, pooled=nets[0].pooled)


@register("ensemble", listed=False)
def ensemble(num_classes, image_size, channels, members: list[dict] | None = None, **_):
    """members: [{"arch", "model_kwargs"}]; the weights come from the checkpoint (`nrrdd ensemble-teachers`)."""
    if not members:
        raise NrrddError("an ensemble is made from teacher files by `nrrdd ensemble-teachers`, not trained")
    return merge_nets([create_model(m["arch"], num_classes, image_size, channels, **m.get("model_kwargs", {}))
                       for m in members])
