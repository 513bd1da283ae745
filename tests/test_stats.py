"""gald.ld_statistics: gate statistics against direct computations on the full gate tensor."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from torch import nn

import gald
import gald.testing
from gald.stats import GateStats, LDStatistics, _GateAccumulator


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Random conv weights and random BatchNorm affine parameters and statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen))
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return module


def _constant_ld(channels: int, offset: float, *, final_act: bool = True) -> gald.LocalDistribution:
    """An LD whose last stage outputs exactly 0 (last norm's weight and bias zeroed), so that
    M = sigmoid(0) = 0.5 everywhere."""
    ld = _randomise(gald.LocalDistribution(channels, offset=offset, final_act=final_act), 1)
    last_norm = [m for m in ld.branch[-1].modules() if isinstance(m, nn.BatchNorm2d)][-1]
    with torch.no_grad():
        last_norm.weight.zero_()
        last_norm.bias.zero_()
    return ld


def _reference(ld: gald.LocalDistribution, xs: list[torch.Tensor]) -> dict[str, float]:
    """The statistics computed directly from the whole gate tensor (all batches concatenated)."""
    ld.eval()
    with torch.no_grad():
        g = torch.cat([ld.mask(x).double() + ld.offset for x in xs])
    std_hw, mean_hw = torch.std_mean(g, dim=(2, 3), correction=0)
    ch_mean = g.mean(dim=(0, 2, 3))
    s_std, s_mean = torch.std_mean(mean_hw, dim=0, correction=0)
    far = (g - mean_hw[..., None, None]).abs() > 0.05 * mean_hw[..., None, None]
    return {
        "mean": float(g.mean()),
        "std": float(g.std(correction=0)),
        "min": float(g.min()),
        "max": float(g.max()),
        "spatial_cv": float((std_hw / mean_hw).mean()),
        "channel_cv": float(ch_mean.std(correction=0) / ch_mean.mean()),
        "sample_cv": float((s_std / s_mean).mean()),
        "far_fraction": float(far.double().mean()),
    }


@pytest.mark.parametrize("offset", [2.0, 1.0, 0.0])
def test_constant_gate_is_exactly_offset_plus_half(offset: float) -> None:
    ld = _constant_ld(6, offset)
    xs = [torch.randn(2, 6, 17, 13) for _ in range(3)]
    s = gald.ld_statistics(ld, xs)
    assert list(s) == [""]
    st = s[""]
    assert st.mean == offset + 0.5
    assert st.min == st.max == offset + 0.5
    assert st.std == 0.0
    assert st.spatial_cv == 0.0
    assert st.channel_cv == 0.0
    assert st.sample_cv == 0.0
    assert st.far_fraction == 0.0
    assert (st.samples, st.channels) == (6, 6)
    assert (st.low, st.high) == (offset + 0.5, offset + 1.0)


def test_random_gate_matches_direct_computation() -> None:
    ld = _randomise(gald.LocalDistribution(5, offset=1.0, final_act=False), 3)
    xs = [torch.randn(b, 5, 16, 20) * 3 for b in (1, 3, 2)]
    st = gald.ld_statistics(ld, xs)[""]
    ref = _reference(ld, xs)
    for key, value in ref.items():
        assert math.isclose(getattr(st, key), value, rel_tol=1e-9, abs_tol=1e-12), key
    assert st.spatial_cv > 0 and st.channel_cv > 0 and st.sample_cv > 0
    with torch.no_grad():
        g = torch.cat([ld.mask(x).double() + ld.offset for x in xs])
    assert torch.allclose(torch.tensor(st.channel_mean, dtype=torch.float64), g.mean(dim=(0, 2, 3)))
    assert 1.0 < st.min <= st.max < 2.0  # final_act=False: (offset, offset + 1)
    assert st.samples == 6


@pytest.mark.parametrize(
    ("act", "final_act", "low_included"),
    [
        (nn.ReLU, True, True),
        (nn.ReLU6, True, True),
        (nn.ReLU, False, False),
        (nn.GELU, True, False),
        (nn.SiLU, True, False),
        (nn.LeakyReLU, True, False),
        (nn.Tanh, True, False),
    ],
)
def test_reported_range_holds_for_every_final_activation(act, final_act, low_included) -> None:
    # [offset + 0.5, offset + 1) only when the last stage ends in a non-negative activation;
    # otherwise the logits can be negative and the gate goes below offset + 0.5
    ld = gald.LocalDistribution(6, offset=2.0, act_layer=act, final_act=final_act)
    with torch.no_grad():
        for p in ld.parameters():
            p.normal_(0.0, 2.0)
    assert ld.gate_range == (2.5 if low_included else 2.0, 3.0, low_included)
    st = gald.ld_statistics(ld, [torch.randn(2, 6, 24, 24) * 3 for _ in range(2)])[""]
    assert (st.low, st.high, st.low_included) == ld.gate_range
    assert st.low <= st.min <= st.max <= st.high
    if not low_included:
        assert st.min < 2.5  # the range reported is really needed
    assert ("[2.5, 3)" if low_included else "(2, 3)") in str(
        gald.ld_statistics(ld, [torch.ones(1, 6, 9, 9)])
    )


def test_several_lds_in_a_head_and_a_wrapped_model() -> None:
    head = _randomise(gald.GALDHead(8, 3, channels=8, ga_module="psp"), 4)
    names = [n for n, m in head.named_modules() if isinstance(m, gald.LocalDistribution)]
    assert names == ["gald.ld"]
    xs = [torch.randn(2, 8, 16, 16)]
    assert list(gald.ld_statistics(head, xs)) == ["gald.ld"]

    model = nn.Sequential(
        gald.GALD(8, "gc", offset=2.0, downsample=False),
        nn.Conv2d(8, 8, 1),
        gald.GALD(8, "psp", offset=1.0, final_act=False, downsample=False),
    )
    _randomise(model, 5)
    xs = [torch.randn(2, 8, 16, 16), torch.randn(3, 8, 16, 16)]
    s = gald.ld_statistics(model, xs)
    assert list(s) == ["0.ld", "2.ld"]
    assert (s["0.ld"].low, s["0.ld"].high) == (2.5, 3.0)
    assert (s["2.ld"].low, s["2.ld"].high) == (1.0, 2.0)
    # each LD's statistics equal the direct computation on the input that LD sees
    with torch.no_grad():
        model.eval()
        first_in = [model[0].ga(x) for x in xs]
        second_in = [model[2].ga(model[1](model[0](x))) for x in xs]
    for name, ld, inputs in (("0.ld", model[0].ld, first_in), ("2.ld", model[2].ld, second_in)):
        ref = _reference(ld, inputs)
        for key, value in ref.items():
            assert math.isclose(getattr(s[name], key), value, rel_tol=1e-9, abs_tol=1e-12), key
        assert s[name].samples == 5
    table = str(s)
    assert "0.ld" in table and "2.ld" in table and "[2.5, 3)" in table and "(1, 2)" in table


def test_tuple_and_dict_batches_and_max_batches() -> None:
    ld = _randomise(gald.LocalDistribution(4), 6)
    xs = [torch.randn(2, 4, 12, 12) for _ in range(4)]
    plain = gald.ld_statistics(ld, xs)[""]
    as_tuples = gald.ld_statistics(ld, [(x, torch.zeros(2)) for x in xs])[""]
    as_dicts = gald.ld_statistics(ld, [{"label": 0, "image": x} for x in xs])[""]
    assert plain == as_tuples == as_dicts
    first_two = gald.ld_statistics(ld, iter(xs), max_batches=2)[""]
    assert first_two == gald.ld_statistics(ld, xs[:2])[""]
    assert first_two.samples == 4


def test_max_batches_does_not_pull_an_extra_batch() -> None:
    ld = gald.LocalDistribution(2)
    pulled = []

    def gen():
        for i in range(10):
            pulled.append(i)
            yield torch.randn(1, 2, 8, 8)

    gald.ld_statistics(ld, gen(), max_batches=3)
    assert pulled == [0, 1, 2]


def test_ld_called_with_a_keyword_argument() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ld = _randomise(gald.LocalDistribution(3), 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # keywords in another order than the signature's: the gate is still x's
            return self.ld(blend=torch.full((1, 3, 1, 1), 0.5), x=x)

    model = Wrapper()
    xs = [torch.randn(2, 3, 12, 12)]
    blended = gald.ld_statistics(model, xs)["ld"]
    own = gald.ld_statistics(model.ld, xs)[""]  # the LD's own gate, g; applied: 1 + (g - 1) / 2
    assert blended.blended and not own.blended
    for field in ("mean", "min", "max"):
        assert math.isclose(getattr(blended, field), 1 + 0.5 * (getattr(own, field) - 1))
    assert math.isclose(blended.std, 0.5 * own.std)


def test_training_flags_restored() -> None:
    model = nn.Sequential(gald.GALD(4, "gc"), nn.Dropout())
    model.train()
    model[1].eval()
    gald.ld_statistics(model, [torch.randn(2, 4, 10, 10)])
    assert model.training and model[0].ld.training and not model[1].training
    assert all(not m._forward_hooks for m in model.modules())


def test_memory_does_not_grow_with_batches() -> None:
    ld = _randomise(gald.LocalDistribution(3), 7)
    acc = _GateAccumulator(ld)
    sizes = []
    for _ in range(6):
        with torch.no_grad():
            acc.update(ld.eval().mask(torch.randn(2, 3, 10, 10)).double() + ld.offset)
        sizes.append(acc.state_numel())
    assert sizes == [sizes[0]] * 6 and sizes[0] == 4 * 3

    # nothing keeps a batch (input or gate) alive once the next one is drawn
    refs: list[weakref.ref] = []

    def batches():
        for _ in range(5):
            if len(refs) >= 1:
                assert refs[-1]() is None, "a previous batch is still referenced"
            x = torch.randn(2, 3, 10, 10)
            refs.append(weakref.ref(x))
            yield (x, None)
            del x

    gald.ld_statistics(ld, batches())
    assert len(refs) == 5


def test_errors() -> None:
    with pytest.raises(ValueError, match="no gald.LocalDistribution"):
        gald.ld_statistics(nn.Conv2d(3, 3, 1), [torch.randn(1, 3, 4, 4)])
    ld = gald.LocalDistribution(3)
    with pytest.raises(ValueError, match="no batch"):
        gald.ld_statistics(ld, [])
    with pytest.raises(ValueError, match="max_batches"):
        gald.ld_statistics(ld, [torch.randn(1, 3, 4, 4)], max_batches=0)
    with pytest.raises(ValueError, match="'image'"):
        gald.ld_statistics(ld, [{"x": torch.randn(1, 3, 4, 4)}])
    with pytest.raises(TypeError, match="batches must yield"):
        gald.ld_statistics(ld, [3])
    with pytest.raises(TypeError, match="model"):
        gald.ld_statistics("model", [torch.randn(1, 3, 4, 4)])  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"got a single tensor of shape \(1, 3, 4, 4\); .*\[batch\]"
    ):
        gald.ld_statistics(ld, torch.randn(1, 3, 4, 4))
    with pytest.raises(TypeError, match="got a single mapping"):
        gald.ld_statistics(ld, {"image": torch.randn(1, 3, 4, 4)})
    with pytest.raises(TypeError, match=r"batches must be an iterable of batches .*got int 5"):
        gald.ld_statistics(ld, 5)  # type: ignore[arg-type]


def test_uncalled_ld_reported_as_not_called() -> None:
    class TwoPaths(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = gald.LocalDistribution(2)
            self.unused = gald.LocalDistribution(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    s = gald.ld_statistics(TwoPaths(), [torch.randn(1, 2, 8, 8)])
    assert s["used"].samples == 1 and s["unused"].samples == 0
    assert math.isnan(s["unused"].mean)
    assert "not called" in str(s)
    assert isinstance(s, LDStatistics) and isinstance(s["used"], GateStats)
    assert s["used"].calls == 1 and s["unused"].calls == 0


def test_ld_that_saw_only_empty_batches_is_not_reported_as_uncalled() -> None:
    ld = gald.LocalDistribution(2)
    s = gald.ld_statistics(ld, [torch.randn(0, 2, 8, 8), torch.randn(0, 2, 5, 5)])
    assert s[""].samples == 0 and s[""].calls == 2
    assert "2 empty batches" in str(s) and "not called" not in str(s)


def test_batches_join_the_model_dtype() -> None:
    ld = gald.LocalDistribution(3).to(torch.bfloat16)
    stats = gald.ld_statistics(ld, [torch.randn(2, 3, 8, 8)])  # float32 batches
    assert stats[""].samples == 2 and 1.5 <= stats[""].mean < 2.0  # offset 1 + M


def test_an_ld_called_twice_per_forward_adds_both_calls() -> None:
    """One LD on two paths: every call counts, as if its inputs had come as separate batches."""
    ld = _randomise(gald.LocalDistribution(6), 4)

    class TwoPaths(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ld = ld

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ld(x) + self.ld(x.flip(-1) * 2)

    xs = [torch.randn(3, 6, 17, 15, dtype=torch.float64) for _ in range(2)]
    s = gald.ld_statistics(TwoPaths().double(), xs)["ld"]
    calls = [t for x in xs for t in (x, x.flip(-1) * 2)]
    assert s.samples == 12
    want = _reference(ld, calls)
    for key, value in want.items():
        assert getattr(s, key) == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_one_sample_has_no_sample_cv() -> None:
    ld = gald.LocalDistribution(4, final_act=False)
    stats = gald.ld_statistics(ld, [torch.randn(1, 4, 16, 16) * 5])
    s = stats[""]
    assert math.isnan(s.sample_cv) and s.spatial_cv > 0 and s.samples == 1
    row = str(stats).splitlines()[-1].split()
    assert row[-3] == "-"  # the sample CV column, before ">5% off" and the sample count
    two = gald.ld_statistics(ld, [torch.randn(2, 4, 16, 16) * 5])[""]
    assert two.sample_cv > 0


def test_a_blended_ld_reports_the_gate_the_block_applies() -> None:
    block = gald.GALD(8, "psp", init="identity").eval()
    x = torch.randn(3, 8, 12, 12)
    s = gald.ld_statistics(block, [x])["ld"]
    assert s.blended and s.mean == 1.0 and s.min == 1.0 and s.max == 1.0  # alpha = 0: identity
    assert "blended" in str(gald.ld_statistics(block, [x]))
    with torch.no_grad():
        block.alpha.fill_(0.5)  # type: ignore[union-attr]
    half = gald.ld_statistics(block, [x])["ld"]
    plain = gald.ld_statistics(gald.GALD(8, "psp").eval(), [x])["ld"]
    assert half.blended and not plain.blended
    assert 1.0 < half.mean < plain.low  # halfway towards the LD's own gate


def test_a_model_compiled_before_the_call_reports_its_gates() -> None:
    """A graph compiled before the hooks exist would skip them: the statistics of a compiled
    model equal the eager model's, under the names without the wrapper's ``_orig_mod``."""
    head = _randomise(gald.GALDHead(16, 3, channels=16), 4).eval()
    x = torch.randn(2, 16, 17, 17)
    compiled = torch.compile(head, backend="eager")
    with torch.no_grad():
        compiled(x)  # compiled without the hooks
    got = gald.ld_statistics(compiled, [x])
    want = gald.ld_statistics(head, [x])
    assert list(got) == list(want) == ["gald.ld"]
    assert got["gald.ld"].samples == 2
    assert got["gald.ld"].mean == pytest.approx(want["gald.ld"].mean, rel=1e-12)


def test_non_finite_gate_values_are_counted_and_shown() -> None:
    ld = _randomise(gald.LocalDistribution(4), 2).eval()
    x = torch.randn(2, 4, 16, 16)
    x[0, 1, 5, 5] = float("nan")
    clean = gald.ld_statistics(ld, [x.nan_to_num()])[""]
    s = gald.ld_statistics(ld, [x])[""]
    with torch.no_grad():
        gate = ld.offset + ld.mask(x)
    assert clean.nonfinite == 0
    assert s.nonfinite == int((~torch.isfinite(gate)).sum()) > 0
    assert math.isnan(s.mean) and math.isnan(s.far_fraction)
    finite = gate[torch.isfinite(gate)]
    assert s.min == pytest.approx(float(finite.min())) and s.max == pytest.approx(
        float(finite.max())
    )
    table = str(gald.ld_statistics(ld, [x]))
    assert f"({s.nonfinite} non-finite gate values)" in table
    assert " nan " in table


def _nan_ld_stats():
    model = nn.Sequential(gald.LocalDistribution(8, padding=1))
    x = torch.full((1, 8, 9, 9), math.nan)
    return gald.ld_statistics(model, [x])


def test_all_nonfinite_gates_give_nan_min_and_max():
    """With no finite gate value, min and max are NaN (documented: 'taken over the finite
    values'), not the accumulator's +inf/-inf start values."""
    (s,) = _nan_ld_stats().values()
    assert s.nonfinite == 8 * 81
    assert math.isnan(s.min) and math.isnan(s.max)


def test_one_sample_with_nonfinite_gates_shows_nan_not_dash():
    """'-' in the sample CV column means 'one sample'; with non-finite gates the table
    must say 'nan' there, as in the other moment columns."""
    table = str(_nan_ld_stats())
    row = table.splitlines()[-1].split()
    assert "-" not in row[2:10], table
