"""Augmentation geometry, refinement (masked / all) and the distill command end to end on digits."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import nrrdd.distill as distill_mod
import nrrdd.refine as refine
from nrrdd import NrrddError
from nrrdd.augment import box_mass, crop_resize, paste_boxes, random_square_boxes, stitch, unstitch
from nrrdd.cam import class_activation_maps
from nrrdd.checkpoint import load_model
from nrrdd.config import PRESETS, SynthConfig, preset_config
from nrrdd.data import normalize
from nrrdd.distill import distill
from nrrdd.files import verify_dir
from nrrdd.losses import noncritical_mask
from nrrdd.models import create_model
from nrrdd.refine import refine_batch, refine_images, to_uint8
from nrrdd.selection import initial_images


# 20 images in 2 refinement batches of 10: small, and the batch split is exercised (resume uses it)
FAST = {"iterations": 5, "ipc": 2, "pool_per_class": 20, "refine_batch": 10}


@pytest.fixture(autouse=True)
def _nrrdd_cache_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("NRRDD_CACHE", str(tmp_path / "nrrdd-cache"))


# ---------------------------------------------------------------- augment geometry

@pytest.mark.parametrize("beta", [1, 4, 9])
def test_stitch_places_patch_i_at_row_i_div_g_col_i_mod_g(beta):
    g, s, c, n = int(beta ** 0.5), 3, 2, 2
    patches = torch.arange(n * beta, dtype=torch.float32)[:, None, None, None].expand(n * beta, c, s, s).contiguous()
    out = stitch(patches, beta)
    assert out.shape == (n, c, g * s, g * s)
    for img in range(n):
        for i in range(beta):
            r, col = i // g, i % g
            block = out[img, :, r * s:(r + 1) * s, col * s:(col + 1) * s]
            assert torch.all(block == img * beta + i), (img, i)


@pytest.mark.parametrize("beta", [1, 4, 9])
def test_unstitch_returns_each_tile_at_full_size(beta):
    """Constant tiles (value i / 255 for tile i) come back in stitch's order, each filling a full-size image."""
    g, s, n = int(beta ** 0.5), 3, 2
    tiles = torch.arange(n * beta, dtype=torch.uint8)[:, None, None, None].expand(n * beta, 3, s, s).contiguous()
    out = unstitch(stitch(tiles, beta), beta)
    assert out.shape == (n * beta, 3, g * s, g * s) and out.dtype == torch.float32
    for i in range(n * beta):
        assert torch.allclose(out[i], torch.full_like(out[i], i / 255)), i


def test_stitch_rejects_non_square_beta():
    with pytest.raises(ValueError):
        stitch(torch.zeros(2, 1, 3, 3), 2)


def test_crop_resize_full_box_is_identity():
    x = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 3)
    assert torch.allclose(crop_resize(x, boxes, 8), x, atol=1e-6)
    # index picks the source image of each box
    index = torch.tensor([2, 0, 2])
    assert torch.allclose(crop_resize(x, boxes, 8, index), x[index], atol=1e-6)


def test_crop_resize_half_box_on_a_ramp_samples_the_quadrant_at_half_pixel_steps():
    # linear ramp v(i, j) = i + 2j: bilinear sampling reproduces it exactly, so the output is the ramp at the
    # sample points (k + 0.5) / 2 - 0.5 of the top-left 4x4 quadrant, clamped at the image border (>= 0)
    i = torch.arange(8.0)
    ramp = (i[:, None] + 2 * i[None, :])[None, None]
    out = crop_resize(ramp, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), 8)[0, 0]
    pts = ((torch.arange(8.0) + 0.5) / 2 - 0.5).clamp_min(0)
    assert torch.allclose(out, pts[:, None] + 2 * pts[None, :], atol=1e-5)


def test_crop_resize_half_box_approximates_upsampled_quadrant():
    g = torch.Generator().manual_seed(1)
    x = F.avg_pool2d(torch.rand(2, 3, 18, 18, generator=g), 3, 1)  # smooth 16x16 images
    for box, sl in (([0, 0, 8, 8], (slice(0, 8), slice(0, 8))), ([8, 8, 16, 16], (slice(8, 16), slice(8, 16)))):
        got = crop_resize(x, torch.tensor([box] * 2, dtype=torch.float32), 16)
        up = F.interpolate(x[:, :, sl[0], sl[1]], size=16, mode="bilinear", align_corners=False)
        # away from the quadrant's inner border the two are the same bilinear samples
        inner = (slice(1, 15), slice(1, 15))
        assert torch.allclose(got[:, :, inner[0], inner[1]], up[:, :, inner[0], inner[1]], atol=1e-5)
        assert (got - up).abs().mean() < 0.02


def test_box_mass_matches_brute_force_sum():
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(3, 6, 7, generator=g, dtype=torch.float64)
    boxes = torch.cat([random_square_boxes(20, 6, 7, (0.05, 1.0), g),
                       torch.tensor([[0.0, 0.0, 7.0, 6.0], [2.0, 3.0, 2.0, 3.0], [1.0, 2.0, 4.0, 3.0]])])
    index = torch.randint(0, 3, (len(boxes),), generator=g)
    got = box_mass(maps, boxes, index)
    for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        want = sum(maps[index[k], yy, xx].item() for yy in range(y1, y2) for xx in range(x1, x2))
        assert got[k].item() == pytest.approx(want, abs=1e-9)


def test_paste_boxes_replaces_inside_and_lam_is_kept_fraction():
    h, w = 6, 8
    x_org = torch.zeros(3, 2, h, w)
    x_aug = torch.ones(3, 2, h, w)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 6.0], [2.0, 1.0, 5.0, 3.0], [4.0, 4.0, 4.0, 6.0]])
    mixed, lam = paste_boxes(x_org, x_aug, boxes)
    # kept share of x_org: 1 - box area / image area
    want = torch.tensor([1 - 48 / 48, 1 - (3 * 2) / 48, 1 - 0 / 48])
    assert torch.allclose(lam, want)
    assert torch.allclose(1 - mixed.mean(dim=(1, 2, 3)), lam)
    assert torch.all(mixed[1, :, 1:3, 2:5] == 1)
    assert mixed[1].sum() == 2 * 6


def test_random_square_boxes_in_bounds_and_square():
    for h, w in ((16, 16), (12, 20)):
        b = random_square_boxes(500, h, w, (0.08, 1.0), torch.Generator().manual_seed(3))
        assert b.shape == (500, 4)
        x1, y1, x2, y2 = b.unbind(1)
        assert torch.equal(b, b.round())
        assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= w).all() and (y2 <= h).all()
        assert torch.equal(x2 - x1, y2 - y1)
        side = x2 - x1
        assert (side >= 1).all() and (side <= min(h, w)).all()
        # the square side follows the drawn area: sqrt(scale * h * w), capped by the short side
        assert side.min() <= int((0.2 * h * w) ** 0.5) and side.max() == min(h, w)
        assert len(set(x1.tolist())) > 3  # positions vary
    again = random_square_boxes(500, 12, 20, (0.08, 1.0), torch.Generator().manual_seed(3))
    assert torch.equal(b, again)


# ---------------------------------------------------------------- refinement

MEAN, STD = (0.5, 0.4, 0.45), (0.25, 0.3, 0.2)


@pytest.fixture(scope="module")
def tiny_teacher():
    torch.manual_seed(0)
    t = create_model("convnet3", 3, 32, width=8)
    t.train()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _ in range(3):
            t(torch.randn(16, 3, 32, 32, generator=g) * 1.5 + 0.3)
    t.set_stats(MEAN, STD).eval()
    assert not torch.allclose(t.features[1].running_var, torch.ones(8))
    return t


def _bounds():
    lo = normalize(torch.zeros(1, 3, 1, 1), MEAN, STD)
    hi = normalize(torch.ones(1, 3, 1, 1), MEAN, STD)
    return lo, hi


def _images(n=6, seed=6):
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return normalize(u8, MEAN, STD), torch.arange(n) % 3


def test_refine_images_masked_keeps_critical_pixels_bit_identical(tiny_teacher):
    x0, y = _images()
    cfg = SynthConfig(iterations=5, refine="masked", epsilon=0.5, lr=0.1, refine_batch=4)
    out, cam = refine_images(tiny_teacher, x0, y, cfg, progress=False)
    assert cam.shape == (6, 32, 32)
    assert torch.allclose(cam, class_activation_maps(tiny_teacher, x0, y))
    critical = (cam >= 0.5)[:, None].expand_as(x0)
    assert critical.any() and (~critical).any()
    assert torch.equal(out[critical], x0[critical])
    changed = (out != x0)[~critical].float().mean()
    assert changed > 0.9
    lo, hi = _bounds()
    assert (out >= lo).all() and (out <= hi).all()
    # the mask is Eq. 4's: pixels with mask 0 are exactly the critical ones
    assert torch.equal(noncritical_mask(cam, 0.5) == 0, cam >= 0.5)


def test_refine_images_all_changes_every_pixel(tiny_teacher):
    x0, y = _images()
    cfg = SynthConfig(iterations=5, refine="all", lr=0.1, refine_batch=6)
    out, cam = refine_images(tiny_teacher, x0, y, cfg, progress=False)
    lo, hi = _bounds()
    assert (out >= lo).all() and (out <= hi).all()
    critical = (cam >= 0.5)[:, None].expand_as(x0)
    # critical pixels move too now
    assert (out != x0)[critical].float().mean() > 0.9
    assert (out != x0).float().mean() > 0.9


def test_refine_images_none_returns_the_initial_images(tiny_teacher):
    x0, y = _images()
    out, _ = refine_images(tiny_teacher, x0, y, SynthConfig(iterations=5, refine="none"), progress=False)
    assert torch.equal(out, x0)


def test_refine_batch_hand_mask_with_label_refinement(tiny_teacher):
    """A hand-made mask (left half 0) with crops, flips and L_lr on: the left half never moves."""
    x0, y = _images(4, seed=7)
    mask = torch.ones(4, 1, 32, 32)
    mask[..., :16] = 0
    mask[..., 16:] = 0.3
    cfg = SynthConfig(iterations=4, lr=0.1, alpha_lr=0.5, refine_crop_min=0.5, refine_flip=True)
    lo, hi = _bounds()
    out = refine_batch(tiny_teacher, x0, y, mask, cfg, lo, hi, torch.Generator().manual_seed(0))
    assert torch.equal(out[..., :16], x0[..., :16])
    assert (out[..., 16:] != x0[..., 16:]).float().mean() > 0.9
    assert (out >= lo).all() and (out <= hi).all()
    # the same generator seed replays the same augmentations: the same result
    again = refine_batch(tiny_teacher, x0, y, mask, cfg, lo, hi, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_refinement_effect_on_a_hand_made_change(tiny_teacher):
    """+10/255 on the left half, where a hand-made CAM is 0 (non-critical): inside |change| 10, outside 0."""
    g = torch.Generator().manual_seed(8)
    u8 = torch.randint(0, 246, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    moved = u8.clone()
    moved[..., :16] += 10
    x0, x, y = normalize(u8, MEAN, STD), normalize(moved, MEAN, STD), torch.tensor([0, 1, 2, 0])
    cam = torch.ones(4, 32, 32)
    cam[..., :16] = 0
    cfg = SynthConfig(refine="masked", epsilon=0.5, refine_batch=3)
    e = refine.refinement_effect(tiny_teacher, x0, x, y, cam, cfg)
    assert e["pixels_255"] == {"inside": {"mean": 10.0, "max": 10.0}, "outside": {"mean": 0.0, "max": 0.0}}
    assert e["inside_fraction"] == 0.5
    with torch.no_grad():
        p = tiny_teacher(x0).softmax(1)
    assert e["teacher_before"]["acc"] == round(100 * (p.argmax(1) == y).float().mean().item(), 2)
    assert e["teacher_before"]["label_prob"] == pytest.approx(p[torch.arange(4), y].mean().item(), abs=1e-4)
    assert e["teacher_before"]["bn_distance"] > 0
    assert e["teacher_after"] != e["teacher_before"]
    same = refine.refinement_effect(tiny_teacher, x0, x0.clone(), y, cam, cfg)
    assert same["pixels_255"]["inside"] == {"mean": 0.0, "max": 0.0}
    assert same["teacher_after"] == same["teacher_before"] == e["teacher_before"]


# ---------------------------------------------------------------- distill end to end

@pytest.fixture(scope="module")
def preset_runs(tmp_path_factory, digits, digits_teacher):
    """Every preset distilled once (lazily): name -> (output folder, config)."""
    root = tmp_path_factory.mktemp("presets")
    runs = {}

    def get(name):
        if name not in runs:
            cfg = preset_config(name, FAST)
            distill(digits, digits_teacher, cfg, root / name, preset=name, device="cpu", progress=False)
            runs[name] = (root / name, cfg)
        return runs[name]
    return get


def _png_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_distils_a_complete_verified_folder(name, preset_runs, digits):
    out, cfg = preset_runs(name)
    assert cfg.ipc == 2 and cfg.iterations == 5 and cfg.pool_per_class == 20 and cfg.refine_batch == 10
    for k, v in PRESETS[name].items():
        if k not in FAST:
            assert getattr(cfg, k) == v
    classes = digits.classes
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(classes)
    for c in classes:
        files = sorted(p.name for p in (out / "images" / c).iterdir())
        assert files == ["0000.png", "0001.png"], (c, files)
    for f in ("distill.json", "config.json", "manifest.json", "synthetic.safetensors", "selection.json",
              "pictures/grid.png", "pictures/refinement.png"):
        assert (out / f).is_file(), f
    assert not (out / ".work").exists()
    assert verify_dir(out) == []
    for pic in ("grid.png", "refinement.png"):
        with Image.open(out / "pictures" / pic) as im:
            assert im.size[0] > 50 and im.size[1] > 50

    record = json.loads((out / "distill.json").read_text())
    assert record["preset"] == name and record["ipc"] == 2 and record["classes"] == classes
    assert record["config"]["iterations"] == 5
    assert json.loads((out / "config.json").read_text()) == record["config"]
    assert len(record["images"]) == 20 and all((out / f).is_file() for f in record["images"])

    # the PNGs are the lossless quantisation of synthetic.safetensors, class folder = label
    syn = load_file(str(out / "synthetic.safetensors"))
    assert syn["images"].shape == (20, 3, 32, 32)
    assert torch.equal(syn["labels"], torch.arange(10).repeat_interleave(2))
    u8 = to_uint8(syn["images"], record["mean"], record["std"])
    for k, rel in enumerate(record["images"]):
        assert rel.split("/")[1] == classes[int(syn["labels"][k])]
        png = torch.from_numpy(np.array(Image.open(out / rel).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(png, u8[k]), rel


def test_random_preset_images_are_the_selected_training_images(preset_runs, digits):
    out, _ = preset_runs("random")
    record = json.loads((out / "distill.json").read_text())
    selection = json.loads((out / "selection.json").read_text())
    for rec in selection:
        c = rec["class"]
        real = digits.train.of_class(c)[rec["source_index"]]
        for i in range(2):
            png = np.asarray(Image.open(out / record["images"][2 * c + i]).convert("RGB"))
            assert np.array_equal(png.transpose(2, 0, 1), real[i].numpy())


def test_nrrdd_refines_only_noncritical_pixels_and_cidd_none(preset_runs, digits, digits_teacher):
    teacher, meta = load_model(digits_teacher, classes=digits.classes)
    for name in ("nrrdd", "cidd"):
        out, cfg = preset_runs(name)
        x0, y, _ = initial_images(teacher, digits.train, 10, cfg, torch.device("cpu"),
                                  progress=False)
        x = load_file(str(out / "synthetic.safetensors"))["images"]
        effect = json.loads((out / "distill.json").read_text()).get("refinement")
        if name == "cidd":
            assert torch.equal(x, x0)
            assert effect is None  # nothing refined, nothing to measure
            continue
        cam = class_activation_maps(teacher, x0, y)
        critical = (cam >= cfg.epsilon)[:, None].expand_as(x0)
        assert critical.any()
        assert torch.equal(x[critical], x0[critical])
        assert (x != x0)[~critical].float().mean() > 0.5
        # the recorded effect agrees: critical pixels unchanged, the others moved, the mask's share of pixels
        assert effect["pixels_255"]["outside"] == {"mean": 0.0, "max": 0.0}
        assert effect["pixels_255"]["inside"]["mean"] > 0
        assert effect["inside_fraction"] == pytest.approx((~critical).float().mean().item(), abs=1e-4)
        assert set(effect["teacher_after"]) == {"acc", "label_prob", "bn_distance"}


def test_distill_beta_4(tmp_path, digits, digits_teacher):
    cfg = preset_config("nrrdd", FAST, {"beta": 4})
    rec = distill(digits, digits_teacher, cfg, tmp_path / "b4", device="cpu", progress=False)
    out = tmp_path / "b4"
    assert len(list((out / "images").rglob("*.png"))) == 20
    assert verify_dir(out) == []
    assert rec["config"]["beta"] == 4
    selection = json.loads((out / "selection.json").read_text())
    assert all(len(r["source_index"]) == 2 * 4 for r in selection)  # ipc x beta patches per class
    with Image.open(out / "images" / "3" / "0001.png") as im:
        assert im.size == (32, 32)


def test_distill_is_deterministic(tmp_path, preset_runs, digits, digits_teacher):
    first, cfg = preset_runs("nrrdd")
    distill(digits, digits_teacher, cfg, tmp_path / "again", preset="nrrdd", device="cpu", progress=False)
    second = tmp_path / "again"
    a, b = _png_files(first), _png_files(second)
    assert len(a) == 20 and a == b
    assert (first / "synthetic.safetensors").read_bytes() == (second / "synthetic.safetensors").read_bytes()
    # another seed selects other initial images
    teacher, meta = load_model(digits_teacher, classes=digits.classes)
    seeded = [initial_images(teacher, digits.train, 10, preset_config("nrrdd", FAST, {"seed": s}),
                             torch.device("cpu"), progress=False)[0] for s in (0, 0, 1)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])


@pytest.mark.parametrize("init", ["patches", "random"])
def test_ipc_larger_than_available_raises(tmp_path, digits, digits_teacher, init):
    cfg = preset_config("cidd", {"ipc": 200, "init": init})
    with pytest.raises(NrrddError, match="ipc"):
        distill(digits, digits_teacher, cfg, tmp_path / "big", device="cpu", progress=False)
    if init == "random":
        # nothing was computed, so a resume with corrected settings is not tied to the failed ones
        fixed = preset_config("random", FAST)
        distill(digits, digits_teacher, fixed, tmp_path / "big", device="cpu", resume=True, progress=False)
        assert verify_dir(tmp_path / "big") == []


def test_unknown_preset_and_bad_fields_raise():
    with pytest.raises(NrrddError, match="unknown preset"):
        preset_config("no-such-preset")
    with pytest.raises(NrrddError, match="unknown SynthConfig field"):
        preset_config("nrrdd", {"ipcc": 3})
    with pytest.raises(NrrddError):
        SynthConfig(beta=2)
    with pytest.raises(NrrddError):
        SynthConfig(refine="some")
    with pytest.raises(NrrddError):
        SynthConfig(ipc=0)


def test_distill_refuses_a_used_folder_without_resume(tmp_path, preset_runs, digits, digits_teacher):
    out, cfg = preset_runs("cidd")
    with pytest.raises(NrrddError, match="--resume"):
        distill(digits, digits_teacher, cfg, out, device="cpu", progress=False)


def test_resume_on_finished_folder_recomputes_nothing(tmp_path, preset_runs, digits, digits_teacher, monkeypatch):
    out, cfg = preset_runs("cidd")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise AssertionError("recomputed")
    monkeypatch.setattr(distill_mod, "initial_images", boom)
    monkeypatch.setattr(distill_mod, "refine_images", boom)
    rec = distill(digits, digits_teacher, cfg, out, device="cpu", resume=True, progress=False)
    assert rec == json.loads((out / "distill.json").read_text())
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # a finished folder made with other settings is not passed off as the asked-for result
    with pytest.raises(NrrddError, match="other settings"):
        distill(digits, digits_teacher, preset_config("cidd", FAST, {"ipc": 3}), out, device="cpu", resume=True,
                progress=False)


def test_resume_after_interrupted_refinement(tmp_path, preset_runs, digits, digits_teacher, monkeypatch):
    """Killed after the first refinement batch: the rerun reuses .work/ and ends with the same images."""
    ref, cfg = preset_runs("nrrdd")  # 20 images in 2 refinement batches, run without interruption
    assert cfg.refine_batch == 10

    real = refine.refine_batch
    calls = []

    def dies_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(refine, "refine_batch", dies_on_second)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        distill(digits, digits_teacher, cfg, out, device="cpu", progress=False)
    assert (out / ".work" / "init.safetensors").exists()
    assert (out / ".work" / "refined_00000.safetensors").exists()
    assert not (out / ".work" / "refined_00001.safetensors").exists()
    assert not (out / "manifest.json").exists()

    # a resume with other settings would mix two runs: refused, and the partial run is left as it was
    with pytest.raises(NrrddError, match="other settings"):
        distill(digits, digits_teacher, preset_config("nrrdd", FAST, {"ipc": 3}), out, device="cpu", resume=True,
                progress=False)
    assert (out / ".work" / "refined_00000.safetensors").exists()

    def no_selection(*a, **k):
        raise AssertionError("initial images recomputed")
    calls.clear()
    monkeypatch.setattr(refine, "refine_batch", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    monkeypatch.setattr(distill_mod, "initial_images", no_selection)
    distill(digits, digits_teacher, cfg, out, device="cpu", resume=True, progress=False)
    assert len(calls) == 1  # only the missing batch was refined
    assert verify_dir(out) == []
    assert _png_files(out) == _png_files(ref)
    assert (out / "synthetic.safetensors").read_bytes() == (ref / "synthetic.safetensors").read_bytes()
    shutil.rmtree(out)


def test_cluster_pick_takes_the_best_of_each_cluster():
    from nrrdd.selection import cluster_pick

    # Two tight directions; by score alone the top two (0.9, 0.8) both sit in the first.
    f = torch.tensor([[1.0, 0.0], [0.99, 0.05], [0.98, -0.05], [0.0, 1.0], [0.05, 0.99]])
    score = torch.tensor([0.9, 0.8, 0.1, 0.3, 0.5])
    for seed in range(5):
        assert cluster_pick(f, score, 2, torch.Generator().manual_seed(seed)).tolist() == [0, 4]
    assert cluster_pick(f, score, 9, torch.Generator().manual_seed(0)).tolist() == [0, 1, 4, 3, 2]


def test_herding_pick_keeps_the_running_mean_nearest_the_class_mean():
    from nrrdd.selection import herding_pick

    # unit features a, b, c; mean (0.533, 0.6). Squared distance of one item to it: a 0.578, b 0.444, c 0.044;
    # of the mean of c and a 0.111, of c and b 0.144. So c, then a, then b; scale does not matter.
    f = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    assert herding_pick(f, 1).tolist() == [2]
    assert herding_pick(f, 2).tolist() == [2, 0]
    assert herding_pick(f, 5).tolist() == [2, 0, 1]


def test_confidence_pick_takes_the_top_the_bottom_or_the_middle_of_the_ranking():
    from nrrdd.selection import confidence_pick

    # ranked by confidence, most first: 3 (0.9), 0 (0.7), 4 (0.5), 1 (0.3), 2 (0.1)
    conf = torch.tensor([0.7, 0.3, 0.1, 0.9, 0.5])
    assert confidence_pick(conf, 2, "highest").tolist() == [3, 0]
    assert confidence_pick(conf, 2, "lowest").tolist() == [2, 1]
    assert confidence_pick(conf, 1, "median").tolist() == [4]
    assert confidence_pick(conf, 3, "median").tolist() == [0, 4, 1]
    assert confidence_pick(conf, 2, "median").tolist() == [0, 4]  # ranks 1-2 of 0-4: the odd one out goes low
    assert confidence_pick(conf, 9, "median").tolist() == [3, 0, 4, 1, 2]


def test_log_odds_separates_what_softmax_rounds_to_one():
    from nrrdd.selection import log_odds

    # class 1 against two zero logits: log(p / (1 - p)) = z - log(e^0 + e^0) = z - log 2
    logits = torch.tensor([[0.0, 2.0, 0.0], [0.0, 20.0, 0.0], [0.0, 30.0, 0.0]])
    assert torch.allclose(log_odds(logits, 1), torch.tensor([2 - math.log(2), 20 - math.log(2), 30 - math.log(2)]))
    assert torch.allclose(torch.sigmoid(log_odds(logits, 1)), torch.softmax(logits, 1)[:, 1])
    p = torch.softmax(logits, 1)[1:, 1]
    assert p[0] == p[1] == 1.0  # float32 cannot tell these two apart by p, nor by cross-entropy
    assert log_odds(logits, 1)[2] > log_odds(logits, 1)[1]
    assert torch.allclose(log_odds(torch.tensor([[1.0, 0.0]]), 0), torch.tensor([1.0]))  # two classes: the gap


def _every_candidate(digits, teacher):
    """cidd's candidate patches of class 3 of the digits and their record, all of them, most confident first:
    what any selection rule with pool_per_class 20 chooses from."""
    pool = preset_config("cidd", {"ipc": 20, "pool_per_class": 20})
    x, _, (everything,) = initial_images(teacher, digits.train, 10, pool, torch.device("cpu"), progress=False,
                                         classes=[3])
    return x, everything


def test_median_selects_from_the_same_candidates_the_middle_of_the_ranking(digits, digits_teacher):
    teacher, _ = load_model(digits_teacher, classes=digits.classes)
    _, everything = _every_candidate(digits, teacher)
    _, _, (rec,) = initial_images(teacher, digits.train, 10, preset_config("cidd", {
        "ipc": 4, "pool_per_class": 20, "select": "median"}), torch.device("cpu"), progress=False, classes=[3])
    n = len(everything["source_index"])
    assert rec["source_index"] == everything["source_index"][(n - 4) // 2:(n - 4) // 2 + 4]


def test_herding_selects_from_the_same_candidates_by_their_features(digits, digits_teacher):
    """select herding draws the pool and crops as every rule does, then takes herding_pick's patches of the
    teacher's features, not the most confident ones."""
    from nrrdd.selection import herding_pick
    teacher, _ = load_model(digits_teacher, classes=digits.classes)
    x, everything = _every_candidate(digits, teacher)
    with torch.no_grad():
        feats = teacher.embed(teacher.features(x))
    herded, _, (rec,) = initial_images(teacher, digits.train, 10, preset_config("cidd", {
        "ipc": 3, "pool_per_class": 20, "select": "herding"}), torch.device("cpu"), progress=False, classes=[3])
    expected = herding_pick(feats, 3)
    assert rec["source_index"] == [everything["source_index"][i] for i in expected]
    assert torch.allclose(herded, x[expected])
    assert rec["source_index"] != everything["source_index"][:3]


def teachers_classes_folder(root, teacher, n_train: int, size: int) -> list[str]:
    """train/ (n_train random PNGs per class) and test/ (one) with the teacher's class folders."""
    from conftest import write_png

    from nrrdd.checkpoint import read_meta
    rng = np.random.default_rng(0)
    classes = read_meta(teacher)["classes"]
    for split, n in (("train", n_train), ("test", 1)):
        for c in classes:
            for i in range(n):
                write_png(root / split / c / f"{i}.png", rng, size)
    return classes


def test_distill_decodes_a_folder_at_the_teachers_resolution(tmp_path, digits_teacher, capsys):
    """Larger photos than the teacher takes are resized as they are decoded, not held at full size and refused
    afterwards; a teacher that recorded other training files is named in a warning."""
    teachers_classes_folder(tmp_path / "photos", digits_teacher, 3, 48)
    cfg = preset_config("random", {"ipc": 1})
    r = distill(str(tmp_path / "photos"), digits_teacher, cfg, tmp_path / "out", preset="random", device="cpu",
                progress=False)
    assert r["data"]["train"]["image_size"] == 32
    assert Image.open(tmp_path / "out" / r["images"][0]).size == (32, 32)
    assert "warning" not in capsys.readouterr().err  # the digits teacher recorded no files to compare


def test_effective_settings_drop_what_cannot_shape_the_images():
    from nrrdd.config import effective_settings, to_dict
    random = effective_settings(to_dict(preset_config("random", {"lr": 0.01, "pool_per_class": 9})))
    assert "lr" not in random and "pool_per_class" not in random and random["init"] == "random"
    cidd = effective_settings(to_dict(preset_config("cidd", {"lr": 0.01})))
    assert "lr" not in cidd and cidd["pool_per_class"] == 300
    nrrdd = effective_settings(to_dict(preset_config("nrrdd")))
    assert nrrdd["lr"] == 0.003 and nrrdd["select"] == "highest"


def test_distill_decodes_only_each_classs_candidate_pool(tmp_path, digits_teacher, monkeypatch):
    """A folder is listed, not decoded: distill decodes pool_per_class images of each class (memory follows the
    pool, not the training set), and the set is the one distilling the fully decoded data gives."""
    import nrrdd.data
    from nrrdd.data import load_dataset
    from nrrdd.files import load_tensors
    classes = teachers_classes_folder(tmp_path / "photos", digits_teacher, 8, 32)
    decoded = []
    real = nrrdd.data.decode_image
    monkeypatch.setattr(nrrdd.data, "decode_image", lambda *a, **k: decoded.append(a[1]) or real(*a, **k))
    cfg = preset_config("cidd", {"ipc": 1, "pool_per_class": 2, "crops_per_image": 2})
    distill(str(tmp_path / "photos"), digits_teacher, cfg, tmp_path / "lazy", preset="cidd", device="cpu",
            progress=False)
    assert len(decoded) == len(classes) * 2 and len(set(decoded)) == len(decoded)
    eager = load_dataset(str(tmp_path / "photos"), 32, progress=False)
    distill(eager, digits_teacher, cfg, tmp_path / "eager", preset="cidd", device="cpu", progress=False)
    a, b = (load_tensors(tmp_path / d / "synthetic.safetensors") for d in ("lazy", "eager"))
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])


def test_class_names_file_names_the_pictures_and_a_bad_one_is_refused_before_any_output(tmp_path, digits_teacher,
                                                                                        digits):
    from nrrdd.data import display_names
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("0 zero, nought\n1 one\nn999 not a class here\n")
    assert display_names(mapping, ["0", "1", "2"]) == ["zero", "one", "2"]
    (tmp_path / "names.json").write_text('{"2": "two"}')
    assert display_names(tmp_path / "names.json", ["1", "2"]) == ["1", "two"]
    cfg = preset_config("random", {"ipc": 1})
    r = distill(digits, digits_teacher, cfg, tmp_path / "out", preset="random", device="cpu", progress=False,
                class_names=mapping)
    assert r["class_names"][:3] == ["zero", "one", "2"] and r["classes"][:2] == ["0", "1"]
    assert (tmp_path / "out" / "images" / "0").is_dir()  # folders keep their names
    (tmp_path / "other.txt").write_text("n01440764 tench, Tinca tinca\n")
    with pytest.raises(NrrddError, match="names none of the 10 class folders"):
        distill(digits, digits_teacher, cfg, tmp_path / "out2", preset="random", device="cpu", progress=False,
                class_names=tmp_path / "other.txt")
    assert not (tmp_path / "out2").exists()
