"""GALDHead and AuxHead: structure, any width, official preset, gradients, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gald
import gald.testing


def test_forward_composition() -> None:
    head = gald.GALDHead(12, 3, channels=16, dropout=0.0).double().eval()
    x = torch.randn(2, 12, 9, 11, dtype=torch.float64)
    y = head.convb(head.gald(head.conva(x)))
    expected = head.cls(head.bottleneck(torch.cat([x, y], 1)))
    torch.testing.assert_close(head(x), expected)
    assert head(x).shape == (2, 3, 9, 11)


@pytest.mark.parametrize("channels", [16, 48, 512])
def test_any_width(channels: int) -> None:
    # the authors' head hard-codes 512 in its classifier; ours follows `channels`
    head = gald.GALDHead(16, 4, channels=channels).eval()
    assert head.cls.in_channels == channels
    assert head(torch.randn(1, 16, 6, 6)).shape == (1, 4, 6, 6)


def test_official_configuration() -> None:
    head = gald.GALDHead.official(in_channels=64, num_classes=19, channels=32)
    assert head.gald.padding == 0 and head.gald.ld.padding == 0
    assert head.gald.down[0].padding == (0, 0)
    assert isinstance(head.gald.ga, gald.ga.CGNL) and head.gald.ga.groups == 8
    assert head.gald.ga.inter_channels == 16 and not head.gald.ga.use_scale
    assert head.gald.ld.final_act and head.gald.ld.offset == 2.0
    assert head.dropout.p == 0.0
    assert all(s[0].padding == (0, 0) for s in head.gald.ld.branch)
    defaults = gald.GALDHead.official()
    assert defaults.in_channels == 2048 and defaults.num_classes == 19 and defaults.channels == 512


def test_official_parameter_count_matches_paper_head() -> None:
    # 24,040,979 parameters for the authors' GALDHead(2048, 512, 19)
    head = gald.GALDHead.official()
    assert sum(p.numel() for p in head.parameters()) == 24_040_979
    assert sum(p.numel() for p in head.gald.ld.parameters()) == 18_432
    aux = gald.AuxHead(1024, 19)
    assert sum(p.numel() for p in aux.parameters()) == 4_729_875


def test_dropout_and_norm_injection() -> None:
    head = gald.GALDHead(
        8,
        2,
        channels=8,
        ga_kwargs={"groups": 2},
        dropout=0.3,
        norm_layer=lambda c: nn.GroupNorm(2, c),
    )
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.3
    assert isinstance(head.conva[1], nn.GroupNorm)
    assert isinstance(head.gald.down[1], nn.GroupNorm)
    assert isinstance(head.gald.ld.branch[0][1], nn.GroupNorm)


def test_aux_head_structure() -> None:
    aux = gald.AuxHead(10, 3, channels=6, dropout=0.1).double().eval()
    x = torch.randn(2, 10, 5, 5, dtype=torch.float64)
    expected = aux.cls(F.relu(aux.norm(aux.conv(x))))
    torch.testing.assert_close(aux(x), expected)
    assert aux.conv.bias is not None and aux.cls.bias is not None


@given(b=st.integers(0, 3), h=st.integers(1, 30), w=st.integers(1, 30))
def test_shape_property(b: int, h: int, w: int) -> None:
    head = gald.GALDHead(8, 3, channels=16).eval()
    assert head(torch.randn(b, 8, h, w)).shape == (b, 3, h, w)


def test_gradients_reach_every_parameter() -> None:
    head = gald.GALDHead(8, 3, channels=16, final_act=False).train()
    aux = gald.AuxHead(8, 3, channels=8).train()
    x = torch.randn(2, 8, 12, 13)
    (head(x).square().mean() + aux(x).square().mean()).backward()
    for name, p in [*head.named_parameters(), *aux.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_gradcheck() -> None:
    head = gald.GALDHead(4, 2, channels=4, ga_kwargs={"groups": 2}, final_act=False).double().eval()
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(head, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"in_channels": 0, "num_classes": 2}, ValueError, "in_channels must be >= 1"),
        ({"in_channels": 4, "num_classes": 0}, ValueError, "num_classes must be >= 1"),
        (
            {"in_channels": 4, "num_classes": 2, "dropout": 1.5},
            ValueError,
            r"dropout must be in \[0, 1\)",
        ),
        (
            {"in_channels": 4, "num_classes": 2, "dropout": "x"},
            TypeError,
            "dropout must be a float",
        ),
        (
            {"in_channels": 4, "num_classes": 2, "channels": 2.5},
            TypeError,
            "channels must be an int",
        ),
    ],
)
def test_bad_constructor(kwargs: dict, exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        gald.GALDHead(**kwargs)


def test_bad_input() -> None:
    head = gald.GALDHead(8, 3, channels=16)
    with pytest.raises(ValueError, match=r"GALDHead: x must have 8 channels"):
        head(torch.randn(1, 9, 8, 8))
    with pytest.raises(ValueError, match=r"AuxHead: x must have 8 channels"):
        gald.AuxHead(8, 3)(torch.randn(1, 9, 8, 8))
    official = gald.GALDHead.official(in_channels=8, num_classes=3, channels=16).eval()
    with pytest.raises(ValueError, match=r">= 15"):
        official(torch.randn(1, 8, 14, 20))


def test_official_presets_take_keywords_as_their_constructors() -> None:
    from gald.models import GALDNet

    with pytest.raises(TypeError):
        gald.GALDHead.official(8, 3, 16)  # type: ignore[misc]  # channels is keyword-only
    with pytest.raises(TypeError):
        GALDNet.official(50)  # type: ignore[misc]  # depth is keyword-only, not num_classes


def test_galdhead_applies_its_dropout():
    """GALDHead(dropout=p) drops channels before the classifier in training."""
    torch.manual_seed(0)
    head = gald.GALDHead(16, 3, channels=8, ga_module="gc", dropout=0.5).train()
    x = torch.randn(2, 16, 9, 9)
    torch.manual_seed(1)
    a = head(x)
    torch.manual_seed(2)
    b = head(x)
    assert not torch.allclose(a, b)
    head.eval()
    torch.testing.assert_close(head(x), head(x))


def test_galdhead_act_layer_reaches_the_gald_block():
    """The ``act_layer`` is the head's activation everywhere, the GALD block's too."""
    head = gald.GALDHead(16, 3, channels=16, act_layer=nn.GELU)
    assert not any(isinstance(m, nn.ReLU) for m in head.modules())
