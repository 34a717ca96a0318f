"""Model registry, the features -> pool -> linear split every model shares, and CAM (Eq. 1)."""
from __future__ import annotations

import pytest
import torch
import torchvision

from nrrdd import NrrddError
from nrrdd.cam import class_activation_maps, normalize_per_image
from nrrdd.models import Net, create_model, model_names


NUM_CLASSES = 5
# Input sides that leave a feature map of at least 2x2 (so a CAM has something to localise) and keep CPU time low.
SIZES = {"convnet": 32, "convnet3": 32, "convnet4": 32, "convnet5": 64, "convnet6": 128,
         "resnet18": 32, "resnet50": 16, "resnet101": 16, "resnet18_imagenet": 64, "resnet50_imagenet": 64,
         "resnet101_imagenet": 64, "mobilenet_v2": 64, "efficientnet_b0": 64}
FEATURE_SIDE = {"convnet": 4, "convnet3": 4, "convnet4": 2, "convnet5": 2, "convnet6": 2,
                "resnet18": 4, "resnet50": 2, "resnet101": 2, "resnet18_imagenet": 2, "resnet50_imagenet": 2,
                "resnet101_imagenet": 2, "mobilenet_v2": 2, "efficientnet_b0": 2}
FLATTENED = {"convnet", "convnet3", "convnet4", "convnet5", "convnet6"}

_cache: dict[str, tuple[Net, torch.Tensor]] = {}


def built(name: str) -> tuple[Net, torch.Tensor]:
    """(model in eval mode, float64; a batch of 2 inputs), built once per test session."""
    if name not in _cache:
        torch.manual_seed(0)
        size = SIZES.get(name, 64)
        kw = {"width": 16} if name == "convnet6" else {}
        model = create_model(name, NUM_CLASSES, image_size=size, **kw).double().eval()
        g = torch.Generator().manual_seed(1)
        # calibrate BatchNorm statistics on random inputs: with the initial ones (mean 0, var 1) the deep
        # torchvision models squash every input to ~1e-10 in eval mode
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        if bns:
            model.train()
            with torch.no_grad():
                model(torch.randn(8, 3, size, size, generator=g, dtype=torch.float64))
            model.eval()
        x = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)
        _cache[name] = (model, x)
    return _cache[name]


def test_registry_lists_the_known_models():
    names = model_names()
    assert names == sorted(names)
    assert set(SIZES) <= set(names)


@pytest.mark.parametrize("name", model_names())
def test_forward_shape(name):
    model, x = built(name)
    with torch.no_grad():
        out = model(x)
        f = model.features(x)
    assert out.shape == (2, NUM_CLASSES) and torch.isfinite(out).all()
    assert f.ndim == 4 and f.shape[0] == 2
    if name in FEATURE_SIDE:
        assert f.shape[-2:] == (FEATURE_SIDE[name],) * 2
    assert model.pooled == (name not in FLATTENED)
    assert model.classifier.in_features == (f.shape[1] if model.pooled else f[0].numel())
    assert (out[0] - out[1]).abs().max() > 1e-9  # the output depends on the input (deep random nets squash it)


@pytest.mark.parametrize("name", model_names())
def test_feature_classifier_split_reproduces_forward(name):
    model, x = built(name)
    with torch.no_grad():
        f = model.features(x)
        emb = model.embed(f)
        split = model.classifier(emb)
        full = model(x)
    torch.testing.assert_close(split, full, rtol=0, atol=1e-12)
    assert emb.shape == (2, f.shape[1] if model.pooled else f[0].numel())
    if model.pooled:
        torch.testing.assert_close(emb, f.mean((2, 3)))


@pytest.mark.parametrize("name", model_names())
def test_cam_identity_eq1(name):
    """logit_y = sum over channels and positions of cam_weights[y] * F, plus the bias (Eq. 1)."""
    model, x = built(name)
    with torch.no_grad():
        f = model.features(x)
        logits = model(x)
        W = model.cam_weights(f.shape)
        bias = model.classifier.bias
        assert W.shape[0] == NUM_CLASSES and W.shape[1] == f.shape[1]
        assert W.shape[2:] == ((1, 1) if model.pooled else f.shape[2:])
        for y in range(NUM_CLASSES):
            logit = (W[y] * f).sum((1, 2, 3)) + bias[y]
            torch.testing.assert_close(logit, logits[:, y], rtol=1e-9, atol=1e-9)
        # the per-position contributions are not all equal (a real map, not a constant)
        contrib = (W[0] * f).sum(1)
        assert contrib.flatten(1).std(1).min() > 0


@pytest.mark.parametrize("name", model_names())
def test_class_activation_maps(name):
    model, x = built(name)
    labels = torch.tensor([0, 3])
    cam = class_activation_maps(model, x, labels)
    assert cam.shape == (2, *x.shape[-2:])
    assert cam.min() >= 0 and cam.max() <= 1
    flat = cam.flatten(1)
    torch.testing.assert_close(flat.min(1).values, torch.zeros(2, dtype=cam.dtype))
    torch.testing.assert_close(flat.max(1).values, torch.ones(2, dtype=cam.dtype))
    # batching does not change the result, and the class matters
    torch.testing.assert_close(class_activation_maps(model, x, labels, batch_size=1), cam)
    other = class_activation_maps(model, x, torch.tensor([1, 1]))
    assert not torch.allclose(other, cam)


def test_cam_matches_hand_computed_map():
    """For a flattened head with features at input resolution the CAM is sum_k W[y,k,i,j] F[k,i,j], min-max scaled."""
    feats = torch.nn.Identity()
    clf = torch.nn.Linear(2 * 2 * 2, 3)
    model = Net(feats, clf, pooled=False).eval()
    x = torch.randn(1, 2, 2, 2)
    with torch.no_grad():
        raw = (clf.weight[2].view(2, 2, 2) * x[0]).sum(0)
    want = (raw - raw.min()) / (raw.max() - raw.min())
    torch.testing.assert_close(class_activation_maps(model, x, torch.tensor([2]))[0], want)


def test_cam_of_empty_batch():
    model, x = built("convnet3")
    out = class_activation_maps(model, x[:0], torch.tensor([], dtype=torch.long))
    assert out.shape == (0, 32, 32)


def test_normalize_per_image_by_hand():
    m = torch.tensor([[[1.0, 3.0], [5.0, 2.0]],
                      [[-4.0, -4.0], [0.0, -2.0]]])
    out = normalize_per_image(m)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.5], [1.0, 0.25]],
                                                  [[0.0, 0.0], [1.0, 0.5]]]))
    # a constant map gives zeros, not NaN
    torch.testing.assert_close(normalize_per_image(torch.full((1, 2, 2), 7.0)), torch.zeros(1, 2, 2))


def test_unknown_model_name():
    with pytest.raises(NrrddError) as e:
        create_model("resnet9000", 10)
    msg = str(e.value)
    assert "resnet9000" in msg
    for n in model_names():
        assert n in msg


@pytest.mark.parametrize("name,size", [("mobilenet_v2", 32), ("efficientnet_b0", 32), ("resnet18_imagenet", 32)])
def test_wrapped_torchvision_models_match_torchvision(name, size):
    """Net re-wraps torchvision's modules; with the same initialisation it computes the same function."""
    builder = {"resnet18_imagenet": torchvision.models.resnet18}.get(name, getattr(torchvision.models, name, None))
    torch.manual_seed(0)
    ours = create_model(name, 7, image_size=size).eval()
    torch.manual_seed(0)
    ref = builder(weights=None, num_classes=7).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


def test_cifar_resnet_stem_keeps_resolution():
    m = create_model("resnet18", 10, image_size=32)
    assert m.features[0].kernel_size == (3, 3) and m.features[0].stride == (1, 1)
    assert isinstance(m.features[3], torch.nn.Identity)
    big = create_model("resnet18", 10, image_size=128)
    assert big.features[0].kernel_size == (7, 7)


def test_convnet_options_and_errors():
    m = create_model("convnet3", 4, image_size=32, channels=1, width=8, norm="instance")
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    has_bn = lambda net: any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in net.modules())
    assert not has_bn(m) and has_bn(create_model("convnet3", 4, width=8))
    assert create_model("convnet", 4, image_size=64, width=8).classifier.in_features == 8 * 4 * 4  # depth 4
    with pytest.raises(NrrddError, match="divisible by 16"):
        create_model("convnet4", 4, image_size=24)
    with pytest.raises(NrrddError, match="no standard depth"):
        create_model("convnet", 4, image_size=48)
    with pytest.raises(NrrddError, match="unknown norm"):
        create_model("convnet3", 4, norm="layer")
