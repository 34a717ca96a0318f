"""The paper's losses and masks on tiny tensors, each against arithmetic written out by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from nrrdd.config import SynthConfig
from nrrdd.losses import (BNStats, bn_stat_loss, dbr_match_loss, hinge_distance_loss, noncritical_mask,
                          soft_cross_entropy, soft_kl)
from nrrdd.refine import refine_batch


@pytest.fixture(autouse=True)
def _nrrdd_cache_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("NRRDD_CACHE", str(tmp_path / "nrrdd-cache"))


def test_noncritical_mask_eq4_on_2x2_cam():
    cam = torch.tensor([[0.0, 0.25], [0.5, 1.0]])
    m = noncritical_mask(cam, 0.5)
    # M = max(0, 0.5 - C): 0.5 - 0 = 0.5, 0.5 - 0.25 = 0.25, 0.5 - 0.5 = 0 (critical), 0.5 - 1 < 0 -> 0
    assert torch.equal(m, torch.tensor([[0.5, 0.25], [0.0, 0.0]]))
    assert m.shape == cam.shape
    # epsilon 0 marks every pixel critical; epsilon above the maximum keeps the pixel order reversed
    assert torch.equal(noncritical_mask(cam, 0.0), torch.zeros(2, 2))
    assert torch.allclose(noncritical_mask(cam, 1.5), torch.tensor([[1.5, 1.25], [1.0, 0.5]]))


def test_bn_stat_loss_two_layers_hand_values():
    batch = [(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])),
             (torch.tensor([3.0]), torch.tensor([4.0]))]
    running = [(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 3.0])),
               (torch.tensor([0.0]), torch.tensor([1.0]))]
    # layer 1: ||(1, 2)||_2 = sqrt(5), ||(0, -2)||_2 = 2; layer 2: |3 - 0| = 3, |4 - 1| = 3 (norms, not squared)
    layer1 = math.sqrt(5) + 2.0
    layer2 = 3.0 + 3.0
    assert bn_stat_loss(batch, running).item() == pytest.approx(layer1 + layer2, rel=1e-6)
    assert bn_stat_loss(batch, running, first_weight=10.0).item() == pytest.approx(10 * layer1 + layer2, rel=1e-6)
    # the weight applies to the first layer only: swapping the layers changes the value
    swapped = bn_stat_loss(batch[::-1], running[::-1], first_weight=10.0).item()
    assert swapped == pytest.approx(10 * layer2 + layer1, rel=1e-6)
    # equal statistics cost nothing
    assert bn_stat_loss(running, running, first_weight=10.0).item() == 0.0


def test_hinge_distance_loss_above_and_below_r():
    r = 0.6931
    d_org = torch.tensor([1.0, 0.2])
    d_aug = torch.tensor([0.5, 2.0])
    # sample 0: (1.0 - r) + 0 (0.5 < r); sample 1: 0 (0.2 < r) + (2.0 - r); batch mean over 2 samples
    want = ((1.0 - r) + (2.0 - r)) / 2
    assert hinge_distance_loss(d_org, d_aug, r).item() == pytest.approx(want, rel=1e-6)
    # everything below r: zero loss
    assert hinge_distance_loss(torch.tensor([0.1, 0.3]), torch.tensor([0.6, 0.0]), r).item() == 0.0


def test_dbr_match_loss_hand_value():
    d_org_s, d_aug_s = torch.tensor([1.0, 2.0]), torch.tensor([0.4, 0.0])
    d_org_t, d_aug_t = torch.tensor([0.5, 3.0]), torch.tensor([0.0, 0.5])
    # sample 0: |1 - 0.5| + |0.4 - 0| = 0.9; sample 1: |2 - 3| + |0 - 0.5| = 1.5; mean = 1.2
    assert dbr_match_loss(d_org_s, d_aug_s, d_org_t, d_aug_t).item() == pytest.approx(1.2, rel=1e-6)
    assert dbr_match_loss(d_org_t, d_aug_t, d_org_t, d_aug_t).item() == 0.0


def test_soft_kl_two_classes_at_temperature():
    T = 2.0
    student = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    e = math.e
    # softened at T = 2: student row 0 = softmax(2/2, 0/2) = (e, 1) / (e + 1); the teacher's softened
    # probabilities for logits (0, 2) at T = 2 are (1, e) / (e + 1)
    ps = (e / (e + 1), 1 / (e + 1))
    pt = (1 / (e + 1), e / (e + 1))
    kl0 = pt[0] * math.log(pt[0] / ps[0]) + pt[1] * math.log(pt[1] / ps[1])
    # row 1: both uniform -> KL 0; batchmean divides by the 2 samples; no T^2 factor
    want = (kl0 + 0.0) / 2
    teacher_probs = torch.tensor([[pt[0], pt[1]], [0.5, 0.5]])
    assert soft_kl(student, teacher_probs, T).item() == pytest.approx(want, rel=1e-5)
    # the temperature really divides the student logits: at T = 1 the value differs
    assert soft_kl(student, teacher_probs, 1.0).item() != pytest.approx(want, rel=1e-3)


def test_soft_cross_entropy_hand_value():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    targets = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    # row 0: softmax = (1/4, 3/4): -(0.5 ln 1/4 + 0.5 ln 3/4); row 1: softmax (1/2, 1/2): -ln 1/2
    row0 = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    row1 = -math.log(0.5)
    assert soft_cross_entropy(logits, targets).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def _manual_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-log softmax(z)[y] with the log-sum-exp written out, batch mean."""
    m = logits.max(1, keepdim=True).values
    lse = (logits - m).exp().sum(1).log() + m[:, 0]
    return (lse - logits[torch.arange(len(y)), y]).mean()


class _TinyTeacher(nn.Module):
    """Two BN layers and a linear head: small enough to write its statistics out by hand."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 1)
        self.bn2 = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.flatten(1))


def _teacher_with_running_stats() -> _TinyTeacher:
    t = _TinyTeacher()
    t.train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            t(torch.randn(8, 2, 4, 4, generator=g) * 2 + 1)
    return t.eval()


def _manual_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = h.shape[0] * h.shape[2] * h.shape[3]
    mean = h.sum(dim=(0, 2, 3)) / n
    var = ((h - mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3)) / n  # biased: divide by n, not n - 1
    return mean, var


def test_bnstats_records_biased_batch_mean_and_var():
    t = _teacher_with_running_stats()
    x = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    bn = BNStats(t)
    assert bn.layers == [t.bn1, t.bn2]
    with torch.no_grad(), bn:
        t(x)
        # inputs of the two BN layers, rebuilt by hand
        h1 = t.conv1(x)
        h2 = t.conv2(torch.relu(t.bn1(h1)))
    stats = bn.pop()
    # the manual forwards inside the block ran bn1 once more: 3 records (bn1, bn2, bn1)
    assert len(stats) == 3
    for (mu, var), h in zip(stats[:2], (h1, h2)):
        m, v = _manual_stats(h)
        assert torch.allclose(mu, m, atol=1e-6)
        assert torch.allclose(var, v, atol=1e-6)
        # and the biased variance really differs from the unbiased one here
        assert not torch.allclose(var, h.var(dim=(0, 2, 3), unbiased=True), atol=1e-6)
    # pop cleared the records; the hooks are gone after the block
    assert bn.pop() == []
    with torch.no_grad():
        t(x)
    assert bn.stats == []
    # running() exposes the layers' running buffers themselves
    (rm1, rv1), (rm2, rv2) = bn.running()
    assert rm1 is t.bn1.running_mean and rv2 is t.bn2.running_var
    assert not torch.allclose(rm1, torch.zeros(3))  # the warm-up gave non-trivial statistics


def _one_step_cfg(**kw) -> SynthConfig:
    base = dict(iterations=1, lr=0.01, refine_crop_min=1.0, refine_flip=False, alpha_bn=0.0, alpha_lr=0.0)
    base.update(kw)
    return SynthConfig(**base)


def _expected_first_adam_step(x0, grad, lr):
    # first Adam step with bias correction: m_hat = g, v_hat = g^2 -> update = lr * g / (|g| + eps)
    return x0 - lr * grad / (grad.abs() + 1e-8)


def test_refinement_objective_is_plain_cross_entropy():
    """One refinement step with L_bn off moves x along the gradient of the CE written out by hand."""
    t = _teacher_with_running_stats()
    x0 = torch.rand(4, 2, 4, 4, generator=torch.Generator().manual_seed(3)) - 0.5
    y = torch.tensor([0, 1, 2, 1])
    cfg = _one_step_cfg()
    x = x0.clone().requires_grad_(True)
    _manual_ce(t(x), y).backward()
    want = _expected_first_adam_step(x0, x.grad, cfg.lr)
    lo, hi = torch.full((1, 2, 1, 1), -10.0), torch.full((1, 2, 1, 1), 10.0)
    got = refine_batch(t, x0, y, torch.ones(4, 1, 4, 4), cfg, lo, hi, torch.Generator().manual_seed(0))
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, x0)


def test_refinement_objective_adds_weighted_bn_loss():
    """With alpha_bn > 0 the step follows CE + alpha_bn * L_bn, L_bn from hand-computed batch statistics."""
    t = _teacher_with_running_stats()
    x0 = torch.rand(4, 2, 4, 4, generator=torch.Generator().manual_seed(4)) - 0.5
    y = torch.tensor([2, 1, 0, 0])
    cfg = _one_step_cfg(alpha_bn=0.5, first_bn_weight=3.0)
    x = x0.clone().requires_grad_(True)
    h1 = t.conv1(x)
    h2 = t.conv2(torch.relu(t.bn1(h1)))
    logits = t.fc(torch.relu(t.bn2(h2)).flatten(1))
    lbn = 0
    for w, h, bnm in ((3.0, h1, t.bn1), (1.0, h2, t.bn2)):
        m, v = _manual_stats(h)
        lbn = lbn + w * (((m - bnm.running_mean) ** 2).sum().sqrt() + ((v - bnm.running_var) ** 2).sum().sqrt())
    (_manual_ce(logits, y) + 0.5 * lbn).backward()
    want = _expected_first_adam_step(x0, x.grad, cfg.lr)
    lo, hi = torch.full((1, 2, 1, 1), -10.0), torch.full((1, 2, 1, 1), 10.0)
    got = refine_batch(t, x0, y, torch.ones(4, 1, 4, 4), cfg, lo, hi, torch.Generator().manual_seed(0))
    assert torch.allclose(got, want, atol=1e-6)
    # and it is not the CE-only step
    x2 = x0.clone().requires_grad_(True)
    _manual_ce(t(x2), y).backward()
    ce_only = _expected_first_adam_step(x0, x2.grad, cfg.lr)
    assert not torch.allclose(got, ce_only, atol=1e-6)


def test_refinement_update_is_scaled_by_the_mask():
    """Eq. 5: the Adam update is multiplied by M per pixel (0: frozen, 0.3: 30 % of the step, 1: full step)."""
    t = _teacher_with_running_stats()
    x0 = torch.rand(4, 2, 4, 4, generator=torch.Generator().manual_seed(5)) - 0.5
    y = torch.tensor([0, 1, 2, 0])
    cfg = _one_step_cfg()
    x = x0.clone().requires_grad_(True)
    _manual_ce(t(x), y).backward()
    mask = torch.ones(4, 1, 4, 4)
    mask[..., :, 0] = 0.0
    mask[..., :, 1] = 0.3
    want = x0 + mask * (_expected_first_adam_step(x0, x.grad, cfg.lr) - x0)
    lo, hi = torch.full((1, 2, 1, 1), -10.0), torch.full((1, 2, 1, 1), 10.0)
    got = refine_batch(t, x0, y, mask, cfg, lo, hi, torch.Generator().manual_seed(0))
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(got[..., 0], x0[..., 0])
    # the bounds clamp the result: a tight box around x0 holds every pixel
    lo2, hi2 = x0.min() - 1e-3, x0.max() + 1e-3
    got = refine_batch(t, x0, y, torch.ones(4, 1, 4, 4), _one_step_cfg(lr=1.0),
                       torch.full((1, 2, 1, 1), lo2.item()), torch.full((1, 2, 1, 1), hi2.item()),
                       torch.Generator().manual_seed(0))
    assert (got >= lo2).all() and (got <= hi2).all()
    assert ((got == lo2) | (got == hi2)).any()


def test_ema_update_moves_weights_by_one_minus_decay_and_copies_buffers():
    from nrrdd.training import ema_copy, ema_update
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ema = ema_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        model[1].running_mean.fill_(3.0)
    ema_update(ema, model, 0.9)
    assert all(torch.allclose(p, torch.full_like(p, 0.1)) for p in ema.parameters())  # 0.9 * 0 + 0.1 * 1
    assert ema[1].running_mean.item() == 3.0 and not any(p.requires_grad for p in ema.parameters())
    ema_update(ema, model, 0.9)
    assert all(torch.allclose(p, torch.full_like(p, 0.19)) for p in ema.parameters())  # 0.9 * 0.1 + 0.1
