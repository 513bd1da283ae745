"""OHEM cross-entropy against a slow, sort-based restatement of the authors' rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gald.losses import OhemCrossEntropy


def slow_ohem(logits, target, *, ignore_index, thresh, min_kept, weight=None):
    """Sort every valid probability, pick the threshold, then plain F.cross_entropy."""
    k_classes = logits.shape[1]
    prob = F.softmax(logits.double(), dim=1).permute(1, 0, 2, 3).reshape(k_classes, -1)
    flat_t = target.reshape(-1).clone()
    valid = flat_t != ignore_index
    num_valid = int(valid.sum())
    if min_kept > num_valid:
        kept = valid  # no mining
    else:
        p_target = torch.ones(flat_t.numel(), dtype=torch.float64)
        idx = torch.nonzero(valid).squeeze(1)
        p_target[idx] = prob[flat_t[idx], idx]
        threshold = thresh
        if min_kept > 0:
            order = torch.sort(p_target).values  # full sort, invalid pixels sit at 1.0
            kth = order[min(min_kept, order.numel()) - 1].item()
            threshold = max(threshold, kth)
        kept = valid & (p_target <= threshold)
    masked = flat_t.masked_fill(~kept, ignore_index).reshape(target.shape)
    if not kept.any():
        return torch.zeros((), dtype=torch.float64)
    return F.cross_entropy(
        logits.double(),
        masked,
        weight=None if weight is None else weight.double(),
        ignore_index=ignore_index,
    )


def _data(b, k, h, w, ignore_frac, seed, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, h, w, generator=g) * sharp
    target = torch.randint(0, k, (b, h, w), generator=g)
    ignore = torch.rand(b, h, w, generator=g) < ignore_frac
    return logits, target.masked_fill(ignore, 255)


@pytest.mark.parametrize("min_kept", [0, 1, 10, 50, 200, 10_000])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_sort_oracle(min_kept: int, ignore_frac: float, weighted: bool) -> None:
    logits, target = _data(2, 5, 9, 11, ignore_frac, seed=min_kept)
    weight = torch.rand(5) + 0.5 if weighted else None
    loss = OhemCrossEntropy(thresh=0.7, min_kept=min_kept, weight=weight)(logits.double(), target)
    ref = slow_ohem(logits, target, ignore_index=255, thresh=0.7, min_kept=min_kept, weight=weight)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)


def test_both_branches_of_min_kept_rule_are_exercised() -> None:
    logits, target = _data(1, 4, 10, 10, 0.5, seed=7, sharp=4.0)
    num_valid = int((target != 255).sum())
    p = F.softmax(logits, 1).gather(1, target.clamp(max=3).unsqueeze(1)).squeeze(1)[target != 255]
    # branch 1: fewer valid pixels than min_kept -> plain CE over the valid pixels
    loss = OhemCrossEntropy(min_kept=num_valid + 1)(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, ignore_index=255))
    # branch 2a: k-th smallest above thresh -> threshold raised, exactly k pixels kept (no ties)
    k = int((p <= 0.3).sum()) + 5
    raised = OhemCrossEntropy(thresh=0.3, min_kept=k)(logits, target)
    kth = p.sort().values[k - 1]
    assert kth > 0.3
    torch.testing.assert_close(
        raised, slow_ohem(logits, target, ignore_index=255, thresh=0.3, min_kept=k).float()
    )
    # branch 2b: k-th smallest below thresh -> threshold stays at thresh
    stays = OhemCrossEntropy(thresh=0.9, min_kept=1)(logits, target)
    keep = p <= 0.9
    manual = -(torch.log(p[keep])).mean()
    torch.testing.assert_close(stays, manual, rtol=1e-5, atol=1e-6)


@given(
    b=st.integers(1, 2),
    k=st.integers(2, 6),
    h=st.integers(1, 8),
    w=st.integers(1, 8),
    min_kept=st.integers(0, 120),
    thresh=st.floats(0.05, 1.0),
    ignore_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_property_matches_oracle(b, k, h, w, min_kept, thresh, ignore_frac, seed) -> None:
    logits, target = _data(b, k, h, w, ignore_frac, seed)
    loss = OhemCrossEntropy(thresh=thresh, min_kept=min_kept)(logits.double(), target)
    ref = slow_ohem(logits, target, ignore_index=255, thresh=thresh, min_kept=min_kept)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)


def test_all_ignored_gives_zero_with_grad() -> None:
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = OhemCrossEntropy()(logits, torch.full((1, 4, 4), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and (logits.grad == 0).all()


def test_gradient_matches_oracle() -> None:
    logits, target = _data(2, 4, 6, 6, 0.2, seed=3)
    a = logits.double().requires_grad_(True)
    b = logits.double().requires_grad_(True)
    OhemCrossEntropy(min_kept=20)(a, target).backward()
    slow_ohem(b, target, ignore_index=255, thresh=0.7, min_kept=20).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_no_sort_in_forward(monkeypatch) -> None:
    def boom(*a, **k):
        raise AssertionError("OHEM must not sort")

    monkeypatch.setattr(torch, "sort", boom)
    monkeypatch.setattr(torch, "argsort", boom)
    monkeypatch.setattr(torch.Tensor, "sort", boom)
    monkeypatch.setattr(torch.Tensor, "argsort", boom)
    logits, target = _data(1, 3, 8, 8, 0.1, seed=0)
    OhemCrossEntropy(min_kept=10)(logits, target)


@pytest.mark.parametrize(
    ("logits", "target", "exc", "pattern"),
    [
        (
            torch.randn(2, 3, 4),
            torch.zeros(2, 4, dtype=torch.long),
            ValueError,
            "logits must be 4-D",
        ),
        (
            torch.randn(2, 3, 4, 4),
            torch.zeros(2, 5, 4, dtype=torch.long),
            ValueError,
            r"target must have shape \(B, H, W\) = \(2, 4, 4\)",
        ),
        (
            torch.randn(2, 3, 4, 4),
            torch.zeros(2, 4, 4),
            TypeError,
            "target must hold integer labels",
        ),
        (
            torch.zeros(2, 3, 4, 4, dtype=torch.long),
            torch.zeros(2, 4, 4, dtype=torch.long),
            TypeError,
            "logits must have a floating dtype",
        ),
        (torch.randn(2, 3, 4, 4), [[0]], TypeError, "target must be a torch.Tensor, got list"),
        (
            torch.randn(2, 3, 4, 4),
            torch.full((2, 4, 4), 3),
            ValueError,
            r"target must hold labels in \[0, 3\) \(the logits' classes\) or "
            r"ignore_index=255, got 3$",
        ),
        (
            torch.randn(2, 3, 4, 4),
            torch.arange(-8, 24).view(2, 4, 4),
            ValueError,
            r"got -8, -7, -6, -5, -4 and 24 other values$",
        ),
        (
            torch.randn(2, 0, 4, 4),
            torch.zeros(2, 4, 4, dtype=torch.long),
            ValueError,
            "logits must have at least one class",
        ),
    ],
)
def test_bad_input(logits, target, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        OhemCrossEntropy()(logits, target)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"thresh": 1.5}, ValueError, r"thresh must be in \[0, 1\]"),
        ({"min_kept": -1}, ValueError, "min_kept must be >= 0"),
        ({"min_kept": 1.0}, TypeError, "min_kept must be an int"),
        ({"weight": torch.ones(2, 2)}, ValueError, "weight must be a 1-D floating tensor"),
    ],
)
def test_bad_constructor(kwargs, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        OhemCrossEntropy(**kwargs)


def test_weight_size_mismatch() -> None:
    with pytest.raises(ValueError, match="weight must have 3 entries"):
        OhemCrossEntropy(weight=torch.ones(4))(
            torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)
        )


def test_poly_schedule_is_torchs_own() -> None:
    # documented recipe: PolynomialLR(power=0.9) gives lr = base * (1 - it/T)^0.9
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=10, power=0.9)
    for it in range(1, 6):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - it / 10) ** 0.9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_are_mined_in_float32(dtype: torch.dtype) -> None:
    # logits of a half-precision model: the loss is the float32 loss of the same (rounded)
    # logits, returned in the logits' dtype, and its gradient reaches them
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 8, 8, generator=gen)).to(dtype).requires_grad_()
    target = torch.randint(0, 5, (2, 8, 8), generator=gen)
    target[0, :2] = 255
    loss_fn = OhemCrossEntropy(thresh=0.6, min_kept=40)
    loss = loss_fn(logits, target)
    want = loss_fn(logits.detach().float(), target)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.float(), want, rtol=1e-2, atol=1e-3)
    loss.backward()
    assert logits.grad is not None and logits.grad.dtype == dtype
    assert torch.isfinite(logits.grad.float()).all() and logits.grad.abs().sum() > 0


def test_the_loss_is_float32_under_autocast_as_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=gen)
    target = torch.randint(0, 3, (2, 4, 5), generator=gen)
    conv = nn.Conv2d(3, 3, 1)
    loss_fn = OhemCrossEntropy(min_kept=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = conv(logits)
        assert half.dtype == torch.bfloat16
        ours, torchs = loss_fn(half, target), F.cross_entropy(half, target)
    assert ours.dtype == torchs.dtype == torch.float32
    want = loss_fn(half.detach().float(), target)
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-6)  # not rounded to bfloat16


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.uint16])
def test_any_integer_target_dtype_gives_the_int64_loss(dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=gen)
    target = torch.randint(0, 3, (2, 4, 5), generator=gen)
    loss = OhemCrossEntropy(min_kept=4)
    torch.testing.assert_close(loss(logits, target.to(dtype)), loss(logits, target))


def test_a_loss_without_kept_pixels_is_plus_zero() -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    out = OhemCrossEntropy(ignore_index=1)(logits, torch.ones(1, 2, 2, dtype=torch.long))
    assert out.item() == 0.0 and math.copysign(1.0, out.item()) == 1.0
    out.backward()
    assert logits.grad is not None and not logits.grad.any()
