"""Label plans (replayable batches), the five label modes, label storage, and student evaluation."""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from nrrdd import NrrddError
from nrrdd.augment import crop_resize
from nrrdd.config import LABEL_MODES, StudentConfig, preset_config
from nrrdd.data import normalize
from nrrdd.distill import distill
from nrrdd.evaluate import evaluate, join_seeds, label_accounting, load_labels, store_labels
from nrrdd.files import verify_dir
from nrrdd.models import create_model
from nrrdd.relabel import MODES, PlanSpec, make_plan, mixed_batch, stored_modes, student_loss, teacher_payload


MEAN, STD = (0.5, 0.4, 0.45), (0.25, 0.3, 0.2)


@pytest.fixture(autouse=True)
def _nrrdd_cache_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("NRRDD_CACHE", str(tmp_path / "nrrdd-cache"))


def _spec(**kw) -> PlanSpec:
    base = dict(num_images=10, epochs=3, batch_size=4, image_size=16, mix="cutmix", mix_alpha=1.0, crop_min=0.5,
                flip=True, seed=0)
    base.update(kw)
    return PlanSpec(**base)


def _images(n=10, size=16, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
            torch.arange(n) % classes)


# ---------------------------------------------------------------- plans

def test_make_plan_shapes():
    spec = _spec()
    p = make_plan(spec)
    nb = 3  # ceil(10 / 4)
    assert p["order"].shape == (3, 10) and p["flip"].shape == (3, 10) and p["pair"].shape == (3, 10)
    assert p["boxes"].shape == (3, 10, 4) and p["lam"].shape == (3, nb) and p["cut"].shape == (3, nb, 4)
    for e in range(3):
        assert sorted(p["order"][e].tolist()) == list(range(10))  # every image once per epoch
        pair = p["pair"][e].tolist()
        # a pairing is a permutation within each batch (sizes 4, 4, 2)
        assert sorted(pair[0:4]) == [0, 1, 2, 3] and sorted(pair[4:8]) == [0, 1, 2, 3] and sorted(pair[8:]) == [0, 1]
    b = p["boxes"].float()
    assert torch.equal(b[..., 2] - b[..., 0], b[..., 3] - b[..., 1])
    assert (b[..., 2] <= 16).all() and (b[..., 3] <= 16).all()
    assert p["flip"].any() and not p["flip"].all()
    assert ((p["lam"] >= 0) & (p["lam"] <= 1)).all()


def test_make_plan_deterministic_and_seeded():
    for mix, alpha in (("cutmix", 1.0), ("mixup", 0.4), ("none", 1.0)):
        a, b = make_plan(_spec(mix=mix, mix_alpha=alpha)), make_plan(_spec(mix=mix, mix_alpha=alpha))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (mix, k)
    a, c = make_plan(_spec()), make_plan(_spec(seed=1))
    assert not torch.equal(a["order"], c["order"])
    assert not torch.equal(a["boxes"], c["boxes"])
    assert not torch.equal(a["lam"], c["lam"])
    assert torch.equal(make_plan(_spec(mix="none"))["lam"], torch.ones(3, 3))
    assert not make_plan(_spec(flip=False))["flip"].any()
    with pytest.raises(NrrddError):
        make_plan(_spec(mix="cutout"))


def test_mixed_batch_replays_identically():
    images, labels = _images()
    spec = _spec()
    plan = make_plan(spec)
    for e, b in ((0, 0), (2, 2)):
        one = mixed_batch(images, labels, plan, spec, e, b, MEAN, STD)
        two = mixed_batch(images, labels, make_plan(spec), spec, e, b, MEAN, STD)
        for u, v in zip(one, two):
            assert torch.equal(u, v)


def _hand_batch(images, labels, plan, spec, e, b):
    """Rebuild one batch from the plan entries, one image at a time."""
    s = spec.image_size
    lo = b * spec.batch_size
    pos = range(lo, min(lo + spec.batch_size, spec.num_images))
    xs = []
    for p in pos:
        i = int(plan["order"][e, p])
        x = normalize(images[i:i + 1], MEAN, STD)
        if spec.crop_min < 1:
            x = crop_resize(x, plan["boxes"][e, p].float()[None], s)
        if plan["flip"][e, p]:
            x = x.flip(-1)
        xs.append(x[0])
    x = torch.stack(xs)
    y = labels[plan["order"][e, list(pos)].long()]
    perm = plan["pair"][e, list(pos)].long()
    return x, y, perm


def test_mixed_batch_cutmix_equals_hand_rebuild():
    images, labels = _images()
    spec = _spec()
    plan = make_plan(spec)
    for e, b in ((0, 0), (1, 1), (2, 2)):
        x, y, perm = _hand_batch(images, labels, plan, spec, e, b)
        x1, y1, x2, y2 = plan["cut"][e, b].long().tolist()
        want = x.clone()
        for i in range(len(x)):
            want[i, :, y1:y2, x1:x2] = x[perm[i], :, y1:y2, x1:x2]
        mixed, y_org, y_aug, lam = mixed_batch(images, labels, plan, spec, e, b, MEAN, STD)
        assert torch.allclose(mixed, want, atol=1e-6)
        assert torch.equal(y_org, y) and torch.equal(y_aug, y[perm])
        kept = 1 - (x2 - x1) * (y2 - y1) / 16 ** 2
        assert torch.allclose(lam, torch.full((len(x),), kept))


def test_mixed_batch_mixup_uses_plan_lambda():
    images, labels = _images()
    spec = _spec(mix="mixup", mix_alpha=0.4, crop_min=1.0)
    plan = make_plan(spec)
    e, b = 1, 0
    x, y, perm = _hand_batch(images, labels, plan, spec, e, b)
    lam = float(plan["lam"][e, b])
    assert 0 < lam < 1
    mixed, y_org, y_aug, got_lam = mixed_batch(images, labels, plan, spec, e, b, MEAN, STD)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm], atol=1e-6)
    assert torch.allclose(got_lam, torch.full((4,), lam))
    assert torch.equal(y_aug, y[perm])


def test_mixed_batch_none_is_crop_and_flip_only():
    images, labels = _images()
    spec = _spec(mix="none", crop_min=1.0, flip=False)
    plan = make_plan(spec)
    mixed, y_org, y_aug, lam = mixed_batch(images, labels, plan, spec, 0, 1, MEAN, STD)
    idx = plan["order"][0, 4:8].long()
    assert torch.equal(mixed, normalize(images[idx], MEAN, STD))
    assert torch.equal(y_org, y_aug) and torch.equal(lam, torch.ones(4))


# ---------------------------------------------------------------- payloads and student losses

def _ce_by_hand(row, target):
    return math.log(sum(math.exp(v) for v in row)) - row[target]


TOP2 = StudentConfig(topk=2)


def test_registry_implements_every_named_mode():
    """config.LABEL_MODES names the modes for --help without torch; relabel.MODES implements exactly those."""
    assert list(MODES) == list(LABEL_MODES)
    assert stored_modes() == ["sl-stored", "dbr", "compact"] and [k for k, m in MODES.items() if m.teacher_online] == [
        "sl-online"]


def test_teacher_payload_modes():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 3.0, 1.0]])
    y_org, y_aug = torch.tensor([0, 2]), torch.tensor([3, 1])
    dbr = teacher_payload("dbr", logits, y_org, y_aug, TOP2)
    assert set(dbr) == {"d_org", "d_aug"} and dbr["d_org"].dtype == torch.float16
    rows = logits.tolist()
    for i in range(2):
        assert float(dbr["d_org"][i]) == pytest.approx(_ce_by_hand(rows[i], int(y_org[i])), rel=1e-3)
        assert float(dbr["d_aug"][i]) == pytest.approx(_ce_by_hand(rows[i], int(y_aug[i])), rel=1e-3)
    comp = teacher_payload("compact", logits, y_org, y_aug, TOP2)
    assert comp["topk_values"].shape == (2, 2) and comp["topk_values"].dtype == torch.float16
    assert comp["topk_index"].tolist() == [[0, 3], [2, 1]] or comp["topk_index"].tolist() == [[0, 3], [2, 3]]
    for i in range(2):
        z = sum(math.exp(v) for v in rows[i])
        for j, cls in enumerate(comp["topk_index"][i].tolist()):
            assert float(comp["topk_values"][i, j]) == pytest.approx(math.exp(rows[i][cls]) / z, rel=1e-3)
    sl = teacher_payload("sl-stored", logits, y_org, y_aug, TOP2)
    assert sl["logits"].dtype == torch.float16 and torch.allclose(sl["logits"].float(), logits)
    with pytest.raises(NrrddError, match="stores nothing"):
        teacher_payload("onehot", logits, y_org, y_aug, TOP2)


def _labels_for(mode, teacher_logits, y_org, y_aug):
    if mode in ("sl-online", "sl-stored"):
        return {"logits": teacher_logits}
    if mode in ("dbr", "compact"):
        return teacher_payload(mode, teacher_logits, y_org, y_aug, TOP2)
    return {}


@pytest.mark.parametrize("mode", LABEL_MODES)
def test_student_loss_every_mode_finite_scalar_with_gradient(mode):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g).requires_grad_(True)
    t_logits = torch.randn(6, 5, generator=g) * 3
    y_org, y_aug = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 1, 3, 0, 2, 4])
    lam = torch.rand(6, generator=g)
    loss = student_loss(mode, logits, y_org, y_aug, lam, _labels_for(mode, t_logits, y_org, y_aug),
                        StudentConfig(temperature=4.0, r=0.6931), 5)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_student_loss_unknown_mode():
    with pytest.raises(NrrddError):
        student_loss("hard", torch.zeros(1, 2), torch.tensor([0]), torch.tensor([0]), torch.ones(1), {}, TOP2, 2)


def test_student_loss_onehot_is_mixed_label_ce():
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    y_org, y_aug, lam = torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([0.7, 0.2])
    e = math.e
    # row 0: target (0.7, 0.3), log softmax(1, 0) = (1 - ln(1 + e), -ln(1 + e)) -> ln(1 + e) - 0.7
    # row 1: target (0, 1) (both labels class 1), uniform prediction -> ln 2
    want = ((math.log(1 + e) - 0.7) + math.log(2)) / 2
    got = student_loss("onehot", logits, y_org, y_aug, lam, {}, TOP2, 2)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_student_loss_mse_with_hard_ce_hand_value():
    # EDC's loss: mean squared logit difference plus 0.025 x the mixed hard-label cross-entropy
    cfg = StudentConfig(soft_loss="mse", hard_ce=0.025)
    logits, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 1.0]])
    y_org, y_aug, lam = torch.tensor([0]), torch.tensor([1]), torch.tensor([0.7])
    mse = ((1 - 3) ** 2 + (0 - 1) ** 2) / 2  # 2.5, mean over the two classes
    ce = math.log(1 + math.e) - 0.7  # target (0.7, 0.3), as in the one-hot test above
    for mode in ("sl-online", "sl-stored"):
        got = student_loss(mode, logits, y_org, y_aug, lam, {"logits": teacher}, cfg, 2)
        assert got.item() == pytest.approx(mse + 0.025 * ce, rel=1e-6)
    # the temperature plays no part in the MSE, and KL keeps its value when only hard_ce is added
    cfg_t = StudentConfig(soft_loss="mse", hard_ce=0.025, temperature=3.0)
    assert student_loss("sl-online", logits, y_org, y_aug, lam, {"logits": teacher}, cfg_t, 2).item() == \
        pytest.approx(mse + 0.025 * ce, rel=1e-6)
    kl = student_loss("sl-online", logits, y_org, y_aug, lam, {"logits": teacher}, StudentConfig(), 2)
    kl_ce = student_loss("sl-online", logits, y_org, y_aug, lam, {"logits": teacher}, StudentConfig(hard_ce=1.0), 2)
    assert kl_ce.item() == pytest.approx(kl.item() + ce, rel=1e-6)
    with pytest.raises(NrrddError, match="hard_ce"):
        StudentConfig(hard_ce=-1.0)


def test_student_loss_soft_dbr_compact_hand_values():
    T = 5.0
    cfg = StudentConfig(temperature=T, r=0.6931, alpha_dbr=0.5)
    # sl: student uniform at any T; teacher logits (T ln 3, 0) soften to (3/4, 1/4)
    student = torch.zeros(1, 2)
    teacher = torch.tensor([[T * math.log(3.0), 0.0]])
    want_kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    for mode in ("sl-online", "sl-stored"):
        got = student_loss(mode, student, None, None, None, {"logits": teacher}, cfg, 2)
        assert got.item() == pytest.approx(want_kl, rel=1e-5)
    # dbr: student logits (1, 0): d_org (class 0) = ln(1 + e) - 1 = 0.3133 < r, d_aug (class 1) = ln(1 + e) = 1.3133
    r, a = 0.6931, 0.5
    d0, d1 = math.log(1 + math.e) - 1, math.log(1 + math.e)
    label = {"d_org": torch.tensor([0.5]), "d_aug": torch.tensor([1.0])}
    want = (0 + (d1 - r)) + a * (abs(d0 - 0.5) + abs(d1 - 1.0))
    got = student_loss("dbr", torch.tensor([[1.0, 0.0]]), torch.tensor([0]), torch.tensor([1]), torch.ones(1), label,
                       cfg, 2)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # compact: top-2 (0.6 for class 2, 0.2 for class 0) renormalised to (0.25, 0, 0.75); uniform student -> ln 3
    label = {"topk_values": torch.tensor([[0.6, 0.2]]).half(), "topk_index": torch.tensor([[2, 0]]).short()}
    got = student_loss("compact", torch.zeros(1, 3), None, None, None, label, cfg, 3)
    assert got.item() == pytest.approx(math.log(3), rel=1e-5)
    # and with a non-uniform student the renormalised target matters: -(0.25 log p0 + 0.75 log p2)
    z = torch.tensor([[1.0, 2.0, 0.0]])
    lse = math.log(math.e + math.e ** 2 + 1)
    want = -(0.25 * (1 - lse) + 0.75 * (0 - lse))
    got = student_loss("compact", z, None, None, None, label, cfg, 3)
    assert got.item() == pytest.approx(want, rel=1e-4)


# ---------------------------------------------------------------- stored labels

@pytest.fixture(scope="module")
def small_teacher():
    torch.manual_seed(0)
    return create_model("convnet3", 10, 16, 3, width=8).set_stats(MEAN, STD).eval()


def _store(tmp_path, teacher, mode, topk=2, epochs=2, shard_mb=256.0):
    images, labels = _images(n=20, size=16, classes=10)
    spec = PlanSpec(20, epochs, 8, 16, "cutmix", 1.0, 1.0, True, 0)
    cfg = StudentConfig(label_mode=mode, topk=topk, shard_mb=shard_mb)
    info = store_labels(tmp_path, teacher, images, labels, spec, cfg, progress=False)
    return info, images, labels, spec


@pytest.mark.parametrize("mode,ratio,per_sample", [("dbr", 5.0, 2 * 2), ("compact", 2.5, 2 * (2 + 2)),
                                                   ("sl-stored", 1.0, 10 * 2)])
def test_store_labels_accounting(tmp_path, small_teacher, mode, ratio, per_sample):
    info, images, labels, spec = _store(tmp_path, small_teacher, mode)
    assert info["ratio_vs_sl"] == ratio
    assert info["mixed_samples"] == 2 * 20
    assert info["payload_bytes"] == 2 * 20 * per_sample  # epochs x N x bytes per mixed sample
    assert info["sl_payload_bytes"] == 2 * 20 * 10 * 2
    assert info["label_file"] == f"labels_{mode}.safetensors"
    assert info["label_file_bytes"] == (tmp_path / info["label_file"]).stat().st_size
    assert info["bookkeeping_bytes"] == (tmp_path / "plan.safetensors").stat().st_size
    _, meta = load_labels(tmp_path, mode, spec, images)
    assert label_accounting(tmp_path, mode, info["bookkeeping_bytes"], spec, 10, per_sample) == info
    assert meta["mode"] == mode and info["label_shards"] == 1


@pytest.mark.parametrize("shard_mb", [256.0, 80 / (1 << 20)])  # one file; one epoch per file (20 x 4 bytes)
def test_stored_dbr_labels_follow_the_replayed_batches(tmp_path, small_teacher, shard_mb):
    info, images, labels, spec = _store(tmp_path, small_teacher, "dbr", epochs=3, shard_mb=shard_mb)
    stored, _ = load_labels(tmp_path, "dbr", spec, images)
    assert info["label_shards"] == (1 if shard_mb > 1 else 3)
    assert stored.epoch(2)["d_org"].shape == (20,) and stored.epoch(2)["d_org"].dtype == torch.float16
    plan = make_plan(spec)
    for e, b in ((0, 0), (1, 2), (2, 1)):
        x, y_org, y_aug, _ = mixed_batch(images, labels, plan, spec, e, b, MEAN, STD)
        with torch.no_grad():
            z = small_teacher(x)
        lab = stored.batch(e, slice(b * spec.batch_size, (b + 1) * spec.batch_size), "cpu")
        for i, row in enumerate(z.tolist()):
            assert float(lab["d_org"][i]) == pytest.approx(_ce_by_hand(row, int(y_org[i])), rel=2e-3, abs=1e-3)
            assert float(lab["d_aug"][i]) == pytest.approx(_ce_by_hand(row, int(y_aug[i])), rel=2e-3, abs=1e-3)


def test_load_labels_refuses_other_images_or_plan(tmp_path, small_teacher):
    _, images, labels, spec = _store(tmp_path, small_teacher, "dbr")
    load_labels(tmp_path, "dbr", spec, images)  # the matching set loads
    other = images.clone()
    other[0, 0, 0, 0] ^= 1
    with pytest.raises(NrrddError, match="other images"):
        load_labels(tmp_path, "dbr", spec, other)
    for changed in (replace(spec, seed=1), replace(spec, epochs=3), replace(spec, batch_size=10),
                    replace(spec, mix="mixup")):
        with pytest.raises(NrrddError, match="another plan"):
            load_labels(tmp_path, "dbr", changed, images)
    with pytest.raises(NrrddError, match="no stored 'compact' labels"):
        load_labels(tmp_path, "compact", spec, images)


def test_shards_are_equal_to_one_file_and_must_cover_every_epoch(tmp_path, small_teacher):
    one, images, _, spec = _store(tmp_path / "one", small_teacher, "compact", epochs=5)
    many, *_ = _store(tmp_path / "many", small_teacher, "compact", epochs=5, shard_mb=2 * 20 * 8 / (1 << 20))
    assert many["label_shards"] == 3 and many["payload_bytes"] == one["payload_bytes"]  # epochs 0-2, 2-4, 4-5
    a, b = (load_labels(tmp_path / d, "compact", spec, images)[0] for d in ("one", "many"))
    for e in range(5):
        assert all(torch.equal(a.epoch(e)[k], b.epoch(e)[k]) for k in a.epoch(e))
    (tmp_path / "many" / "labels_compact.e00002-00004.safetensors").unlink()  # a shard lost
    with pytest.raises(NrrddError, match=r"do not cover epochs 0-5"):
        load_labels(tmp_path / "many", "compact", spec, images)


# ---------------------------------------------------------------- evaluate end to end

@pytest.fixture(scope="session")
def distilled_digits(tmp_path_factory, digits, digits_teacher):
    """A tiny digits teacher (2 epochs) and a 2-image-per-class distilled set from it."""
    root = tmp_path_factory.mktemp("labels-e2e")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NRRDD_CACHE", str(root / "cache"))
        cfg = preset_config("nrrdd", {"iterations": 3, "ipc": 2, "pool_per_class": 20})
        distill(digits, digits_teacher, cfg, root / "d", preset="nrrdd", device="cpu",
                progress=False)
    return root / "d"


def _check_results(out, r, mode):
    assert r == json.loads((out / "results.json").read_text())
    assert r["seeds"] == [0, 1] and [s["seed"] for s in r["per_seed"]] == [0, 1]
    accs = [s["test_acc"] for s in r["per_seed"]]
    assert all(0 <= a <= 100 for a in accs)
    assert r["test_mean"] == round(statistics.mean(accs), 2)
    assert r["test_std"] == round(statistics.stdev(accs), 2)
    vals = [s["val_acc"] for s in r["per_seed"]]
    assert r["val_mean"] == round(statistics.mean(vals), 2)
    assert r["config"]["label_mode"] == mode and r["config"]["epochs"] == 3
    assert r["data"] == "digits" and r["ipc"] == 2 and r["preset"] == "nrrdd"
    # RDED batch rule: 50 for IPC 2..10, capped at the 20 images
    assert r["plan"]["num_images"] == 20 and r["plan"]["batch_size"] == 20 and r["plan"]["epochs"] == 3
    for s in (0, 1):
        assert json.loads((out / "seeds" / f"seed_{s}.json").read_text())["test_acc"] == accs[s]
    assert verify_dir(out) == []


def test_evaluate_sl_online(tmp_path, distilled_digits, digits):
    cfg = StudentConfig(label_mode="sl-online", epochs=3, seeds=2, width=16)
    out = tmp_path / "sl"
    r = evaluate(distilled_digits, cfg, out, device="cpu", progress=False, data=digits)
    _check_results(out, r, "sl-online")
    assert r["labels"] == {}
    assert not list(out.glob("labels_*.safetensors"))
    # finished: resume returns the stored results without training
    assert evaluate(distilled_digits, cfg, out, device="cpu", resume=True, progress=False, data=digits) == r


def test_evaluate_dbr_reports_label_bytes(tmp_path, distilled_digits, digits):
    cfg = StudentConfig(label_mode="dbr", epochs=3, seeds=2, width=16)
    out = tmp_path / "dbr"
    r = evaluate(distilled_digits, cfg, out, device="cpu", progress=False, data=digits)
    _check_results(out, r, "dbr")
    lab = r["labels"]
    assert lab["payload_bytes"] == 3 * 20 * 2 * 2  # epochs x N x 2 distances x fp16
    assert lab["ratio_vs_sl"] == 5.0
    assert lab["mixed_samples"] == 60
    assert (out / "labels_dbr.safetensors").stat().st_size == lab["label_file_bytes"]
    assert (out / "plan.safetensors").stat().st_size == lab["bookkeeping_bytes"]


def test_evaluate_resume_continues_the_same_recipe_only(tmp_path, distilled_digits, digits, monkeypatch):
    import nrrdd.evaluate as ev
    cfg = StudentConfig(label_mode="onehot", epochs=2, seeds=2, width=8)
    out = tmp_path / "ev"
    real, calls = ev.train_student, []

    def dies_on_second(*a, **k):
        calls.append(a[5])  # seed
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(ev, "train_student", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        evaluate(distilled_digits, cfg, out, device="cpu", progress=False, data=digits)
    assert (out / "seeds" / "seed_0.json").exists() and not (out / "results.json").exists()
    # another recipe (more epochs) must not reuse seed 0's result
    with pytest.raises(NrrddError, match="other settings .differing: config.epochs"):
        evaluate(distilled_digits, replace(cfg, epochs=3), out, device="cpu", resume=True, progress=False,
                 data=digits)
    calls.clear()
    monkeypatch.setattr(ev, "train_student", lambda *a, **k: (calls.append(a[5]), real(*a, **k))[1])
    r = evaluate(distilled_digits, cfg, out, device="cpu", resume=True, progress=False, data=digits)
    assert calls == [1]  # seed 0 was reused, only seed 1 trained
    assert r["seeds"] == [0, 1]
    assert r["per_seed"][0] == json.loads((out / "seeds" / "seed_0.json").read_text())
    assert verify_dir(out) == [] and not list(out.glob(".*"))
    with pytest.raises(NrrddError, match="other settings .differing: config.epochs"):
        evaluate(distilled_digits, replace(cfg, epochs=3), out, device="cpu", resume=True, progress=False,
                 data=digits)


def test_evaluate_rejects_mismatched_classes(tmp_path, digits):
    folder = tmp_path / "three"
    rng = np.random.default_rng(0)
    for c in ("0", "1", "2"):
        (folder / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    cfg = StudentConfig(data="digits", label_mode="onehot", epochs=1, seeds=1, width=8)
    with pytest.raises(NrrddError, match="do not match"):
        evaluate(folder, cfg, tmp_path / "out", device="cpu", progress=False)


def test_evaluate_without_data_name_raises(tmp_path):
    folder = tmp_path / "plain"
    (folder / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a" / "0.png")
    with pytest.raises(NrrddError, match="--data"):
        evaluate(folder, StudentConfig(label_mode="onehot"), tmp_path / "out", device="cpu", progress=False)


def test_evaluate_resume_with_more_seeds_trains_only_the_new_ones(tmp_path, distilled_digits, digits, monkeypatch):
    import nrrdd.evaluate as ev
    cfg = StudentConfig(label_mode="onehot", epochs=2, seeds=1, width=8)
    out = tmp_path / "ev"
    one = evaluate(distilled_digits, cfg, out, device="cpu", progress=False, data=digits)
    real, calls = ev.train_student, []
    monkeypatch.setattr(ev, "train_student", lambda *a, **k: (calls.append(a[5]), real(*a, **k))[1])
    three = evaluate(distilled_digits, replace(cfg, seeds=3), out, device="cpu", resume=True, progress=False,
                     data=digits)
    assert calls == [1, 2] and three["seeds"] == [0, 1, 2]
    assert three["per_seed"][0] == one["per_seed"][0]
    assert verify_dir(out) == [] and not list(out.glob(".*"))


def test_evaluate_resume_refuses_another_distilled_set(tmp_path, distilled_digits, digits):
    """Seeds trained on one distilled set must never be reused for another (here: one image changed)."""
    import shutil

    from PIL import Image
    other = tmp_path / "other"
    shutil.copytree(distilled_digits, other)
    png = sorted((other / "images").rglob("*.png"))[0]
    Image.fromarray(255 - np.asarray(Image.open(png))).save(png)
    cfg = StudentConfig(label_mode="onehot", epochs=1, seeds=1, width=8)
    out = tmp_path / "ev"
    evaluate(distilled_digits, cfg, out, device="cpu", progress=False, data=digits)
    for seeds in (1, 2):  # whether finished or asked for more seeds
        with pytest.raises(NrrddError, match="distilled set"):
            evaluate(other, replace(cfg, seeds=seeds), out, device="cpu", resume=True, progress=False, data=digits)


def test_ipc_and_batch_size_come_from_one_rule(tmp_path, digits, digits_teacher):
    """105 images over 10 classes (a plain ImageFolder, so no recorded IPC): relabel and evaluate derive the
    same IPC (11, the largest class share) and batch size, so evaluate accepts the labels relabel stored."""
    from nrrdd.config import images_per_class
    from nrrdd.files import read_tensor_meta
    from nrrdd.relabel import relabel_set
    folder = tmp_path / "plain"
    counts = [11] * 5 + [10] * 5
    for c, n in enumerate(counts):
        (folder / str(c)).mkdir(parents=True)
        for i, img in enumerate(digits.train.of_class(c)[:n]):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / str(c) / f"{i}.png")
    assert images_per_class(105, 10) == 11 and images_per_class(105, 10, recorded=10) == 10
    cfg = StudentConfig(data="digits", label_mode="dbr", epochs=1, seeds=1, width=8)
    info = relabel_set(folder, digits_teacher, cfg, tmp_path / "labels", device="cpu", progress=False)
    plan = json.loads(read_tensor_meta(tmp_path / "labels" / "labels_dbr.safetensors")["plan"])
    assert plan["batch_size"] == 100 and info["mixed_samples"] == 105
    r = evaluate(folder, cfg, tmp_path / "ev", teacher_path=digits_teacher, labels_dir=tmp_path / "labels",
                 device="cpu", progress=False, data=digits)
    assert r["ipc"] == 11 and r["plan"]["batch_size"] == 100



def test_unstitch_trains_on_the_tiles_and_relabel_agrees(tmp_path, digits, digits_teacher):
    """Multi-formation: a beta-4 set of IPC 1 gives the student 4 full-size tiles per class; stored labels
    made with the same recipe fit those 40 samples."""
    from nrrdd.relabel import relabel_set
    cfg = preset_config("cidd", {"ipc": 1, "beta": 4, "pool_per_class": 20})
    distill(digits, digits_teacher, cfg, tmp_path / "d", preset="cidd", device="cpu", progress=False)
    student = StudentConfig(label_mode="dbr", epochs=1, seeds=1, width=8, unstitch=True)
    info = relabel_set(tmp_path / "d", digits_teacher, student, tmp_path / "labels", device="cpu", progress=False)
    assert info["mixed_samples"] == 40
    r = evaluate(tmp_path / "d", student, tmp_path / "ev", labels_dir=tmp_path / "labels", device="cpu",
                 progress=False, data=digits)
    assert r["plan"]["num_images"] == 40 and r["plan"]["batch_size"] == 40
    whole = evaluate(tmp_path / "d", StudentConfig(label_mode="onehot", epochs=1, seeds=1, width=8), tmp_path / "ev1",
                     device="cpu", progress=False, data=digits)
    assert whole["plan"]["num_images"] == 10


@pytest.mark.parametrize("mode", ["sl-online", "dbr"])
def test_baseline_random_is_the_random_preset_under_the_same_recipe(tmp_path, distilled_digits, digits,
                                                                    digits_teacher, mode):
    """--baseline random trains on exactly the images the random preset would store for the set (same seed,
    ipc, beta), with the same plan and labels: its seeds equal an evaluation of that preset's folder."""
    cfg = dict(label_mode=mode, epochs=2, seeds=2, width=16)
    r = evaluate(distilled_digits, StudentConfig(baseline="random", **cfg), tmp_path / "e", device="cpu",
                 progress=False, data=digits)
    distill(digits, digits_teacher, preset_config("random", {"ipc": 2}), tmp_path / "random", preset="random",
            device="cpu", progress=False)
    plain = evaluate(tmp_path / "random", StudentConfig(**cfg), tmp_path / "r", device="cpu", progress=False,
                     data=digits)
    base = r["baseline"]
    assert base["kind"] == "random" and base["images_sha256"] == plain["inputs"]["images_sha256"]
    assert [s["weights_sha256"] for s in base["per_seed"]] == [s["weights_sha256"] for s in plain["per_seed"]]
    assert base["test_mean"] == plain["test_mean"] and base["val_mean"] == plain["val_mean"]
    assert r["ior"] == {"test": round(r["test_mean"] - plain["test_mean"], 2),
                        "val": round(r["val_mean"] - plain["val_mean"], 2)}
    assert r["teacher_test_acc"] is not None
    assert verify_dir(tmp_path / "e") == []


def test_join_seeds_recomputes_statistics_by_hand():
    def rec(vals, base, wall):
        per = [{"seed": s, "val_acc": v, "test_acc": v + 1} for s, v in vals]
        bper = [{"seed": s, "val_acc": v, "test_acc": v} for s, v in base]
        return {"seeds": [s for s, _ in vals], "per_seed": per, "config": {"first_seed": vals[0][0], "seeds": len(vals)},
                "wall_time_s": wall, "baseline": {"seeds": [s for s, _ in base], "per_seed": bper}}
    # seeds 0 | 1, 2: val 60, 62, 64 -> mean 62, sample std 2; random 58, 58, 61 -> 59; gain 3 (val), 4 (test)
    r = join_seeds([rec([(1, 62.0), (2, 64.0)], [(1, 58.0), (2, 61.0)], 20.0), rec([(0, 60.0)], [(0, 58.0)], 10.5)])
    assert r["seeds"] == [0, 1, 2] and (r["val_mean"], r["val_std"], r["test_mean"]) == (62.0, 2.0, 63.0)
    assert r["baseline"]["val_mean"] == 59.0 and r["ior"] == {"test": 4.0, "val": 3.0}
    assert r["config"] == {"first_seed": 0, "seeds": 3} and r["wall_time_s"] == 30.5
    with pytest.raises(ValueError, match="share seeds"):
        join_seeds([rec([(0, 60.0)], [(0, 1.0)], 1.0), rec([(0, 61.0)], [(0, 1.0)], 1.0)])
