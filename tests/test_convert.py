"""Official checkpoint conversion: keys, safety, and numerical parity with the authors' semantics."""

from __future__ import annotations

import pytest
import torch

import gald
from _official_reference import RefNet, randomise_
from gald.convert import load_official, official_to_gald

IN, INTER, CLASSES, DSN_IN = 32, 16, 5, 24


def _reference(seed: int) -> RefNet:
    gen = torch.Generator().manual_seed(seed)
    return randomise_(RefNet(IN, INTER, CLASSES, DSN_IN), gen)


def _assert_close_rel(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert scale > 1e-3, "comparison would be vacuous"
    assert err <= rtol * scale, f"max abs error {err:.3e} > {rtol:g} x {scale:.3e}"


@pytest.mark.parametrize("prefix", ["", "module."])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("seed", [0, 1])
def test_official_parity(prefix: str, mode: str, seed: int) -> None:
    ref = _reference(seed)
    sd = {prefix + k: v for k, v in ref.state_dict().items()}
    head_sd, aux_sd = official_to_gald(sd)

    head = gald.GALDHead.official(in_channels=IN, num_classes=CLASSES, channels=INTER)
    aux = gald.AuxHead(DSN_IN, CLASSES, channels=INTER)
    head.load_state_dict(head_sd, strict=True)
    aux.load_state_dict(aux_sd, strict=True)

    torch.manual_seed(100 + seed)
    x = torch.randn(2, IN, 19, 23, dtype=torch.float64)
    feat3 = torch.randn(2, DSN_IN, 19, 23, dtype=torch.float64)
    ref, head, aux = ref.double(), head.double(), aux.double()
    for m in (ref, head, aux):
        m.train(mode == "train")
    # dropout in the aux head is random in train mode; compare it in eval only
    aux.dropout.eval()
    ref.dsn[3].eval()
    _assert_close_rel(head(x), ref.head(x))
    _assert_close_rel(aux(feat3), ref.dsn(feat3))
    if mode == "train":  # running statistics moved the same way
        _assert_close_rel(
            head.gald.ld.branch[2][1].running_mean,
            ref.head.a2block.local_attention.dconv3[1].running_mean,
        )


def test_official_parity_float32_realistic_width() -> None:
    # The authors' widths (512 inner) on a tiny map, fp32: still 1e-5 relative.
    ref = randomise_(RefNet(64, 512, 3, 8), torch.Generator().manual_seed(3)).eval()
    head_sd, _ = official_to_gald(ref.state_dict())
    head = gald.GALDHead.official(in_channels=64, num_classes=3, channels=512).eval()
    head.load_state_dict(head_sd, strict=True)
    x = torch.randn(1, 64, 15, 17)
    with torch.no_grad():
        _assert_close_rel(head(x), ref.head(x), rtol=1e-5)


def test_no_dsn_gives_empty_aux() -> None:
    sd = {k: v for k, v in _reference(0).state_dict().items() if not k.startswith("dsn.")}
    head_sd, aux_sd = official_to_gald(sd)
    assert aux_sd == {}
    assert len(head_sd) == len(gald.GALDHead.official(IN, CLASSES, INTER).state_dict())


def test_backbone_keys_ignored_and_unknown_keys_listed() -> None:
    sd = dict(_reference(0).state_dict())
    assert any(k.startswith(("conv1.", "bn1.", "layer4.")) for k in sd)
    head_sd, _ = official_to_gald(sd)
    assert not any(k.startswith(("conv1", "bn1", "layer")) for k in head_sd)
    sd["module.head.extra.weight"] = torch.zeros(1)
    sd["criterion.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"criterion\.weight.*module\.head\.extra\.weight"):
        official_to_gald(sd)


def test_bad_state_dict_type() -> None:
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        official_to_gald([("a", torch.zeros(1))])  # type: ignore[arg-type]


def test_load_official_is_weights_only(tmp_path) -> None:
    sd = _reference(0).state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": sd}, path)
    loaded = load_official(path)
    assert set(loaded) == set(sd)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pth"
    torch.save({"state_dict": sd, "x": Evil()}, bad)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        load_official(bad)


def test_load_official_rejects_non_state_dict(tmp_path) -> None:
    path = tmp_path / "t.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_official(path)
