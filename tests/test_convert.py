"""Official checkpoint conversion: keys, safety, and numerical parity with the authors' semantics."""

from __future__ import annotations

import re

import pytest
import torch

import gald
from _official_reference import RefGALDNet, RefNet, randomise_, upsample_align_corners
from gald.convert import load_official, official_to_gald, official_to_galdnet
from gald.models import DilatedResNet, GALDNet

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


def test_no_dsn_gives_empty_aux() -> None:
    sd = {k: v for k, v in _reference(0).state_dict().items() if not k.startswith("dsn.")}
    head_sd, aux_sd = official_to_gald(sd)
    assert aux_sd == {}
    assert len(head_sd) == len(gald.GALDHead.official(IN, CLASSES, channels=INTER).state_dict())


def test_backbone_keys_ignored_and_unknown_keys_listed() -> None:
    sd = dict(_reference(0).state_dict())
    assert any(k.startswith(("conv1.", "bn1.", "layer4.")) for k in sd)
    head_sd, _ = official_to_gald(sd)
    assert not any(k.startswith(("conv1", "bn1", "layer")) for k in head_sd)
    sd["module.head.extra.weight"] = torch.zeros(1)
    sd["criterion.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"criterion\.weight.*module\.head\.extra\.weight"):
        official_to_gald(sd)


def test_a_key_with_and_without_the_prefix_is_refused() -> None:
    sd = dict(_reference(0).state_dict())
    key = next(k for k in sd if k.startswith("head."))
    sd["module." + key] = sd[key].clone()
    for convert in (official_to_gald, official_to_galdnet):
        with pytest.raises(ValueError, match=rf"'{key}' and 'module.{key}', the same key"):
            convert(sd)


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
    # refused with gald's own message: torch's would advise weights_only=False
    with pytest.raises(
        ValueError, match=r"cannot be read as a checkpoint of tensors only .*UnpicklingError"
    ) as info:
        load_official(bad)
    assert "weights_only=False" not in str(info.value)


def test_load_official_rejects_non_state_dict(tmp_path) -> None:
    path = tmp_path / "t.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_official(path)
    torch.save({"a": {}}, path)  # a mapping, but not of tensors
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_official(path)
    path.write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot be read as a checkpoint of tensors only"):
        load_official(path)
    with pytest.raises(FileNotFoundError):
        load_official(tmp_path / "missing.pth")


def test_converters_refuse_empty_and_non_tensor_state_dicts() -> None:
    with pytest.raises(ValueError, match=r"no head\.\* keys .*: it is empty"):
        official_to_gald({})
    with pytest.raises(ValueError, match=r"no head\.\* keys .*: it holds a backbone only"):
        official_to_gald({"conv1.0.weight": torch.zeros(1)})
    with pytest.raises(TypeError, match=r"values must be tensors, got str for 'head\.x'"):
        official_to_gald({"head.x": "x"})
    with pytest.raises(ValueError, match=r"no backbone keys .*: it is empty"):
        gald.convert.imagenet_to_backbone({})
    with pytest.raises(ValueError, match=r"no backbone keys .*: it holds only fc\.\*"):
        gald.convert.imagenet_to_backbone({"fc.weight": torch.zeros(1)})


# --------------------------------------------------------------------------- the whole network

FULL_CLASSES = 19


@pytest.fixture(scope="module")
def authors_r50():
    """The restated authors' GALD_res50 with random weights and BN statistics, and our network
    loaded from its state dict (as their training script saves it: ``module.`` prefix, under
    ``state_dict``) through ``load_official_galdnet``."""
    with torch.device("meta"):
        ref = RefGALDNet(50, FULL_CLASSES)
    ref = ref.to_empty(device="cpu")  # every tensor is overwritten below: skip the default init
    for name, buf in ref.named_buffers():
        if name.endswith("num_batches_tracked"):
            buf.zero_()
    randomise_(ref, torch.Generator().manual_seed(7), fan_in=True).eval()
    checkpoint = {"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}
    with pytest.MonkeyPatch.context() as mp:  # the file read itself is tested above
        mp.setattr(gald.convert, "load_official", lambda path: dict(checkpoint["state_dict"]))
        net = gald.convert.load_official_galdnet("GALD_res50.pth", depth=50)
    return ref, net.eval()


def test_loaded_network_is_the_authors_configuration(authors_r50) -> None:
    _, net = authors_r50
    assert isinstance(net, GALDNet) and isinstance(net.backbone, DilatedResNet)
    assert net.num_classes == FULL_CLASSES  # read from the classifier
    assert net.backbone.depth == 50 and net.backbone.output_stride == 8
    assert net.min_input_size == 111
    assert sum(p.numel() for p in net.parameters()) == 52_402_662
    assert sum(p.numel() for p in net.head.parameters()) == 24_040_979
    assert sum(p.numel() for p in net.aux_head.parameters()) == 4_729_875


def test_whole_network_parity_float32(authors_r50) -> None:
    # 111 px: the smallest input of the authors' network (a 15x15 feature for the unpadded LD)
    ref, net = authors_r50
    x = torch.randn(1, 3, 111, 115, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        out = net(x)
        main, dsn = ref(x)
    assert out["out"].shape == (1, FULL_CLASSES, 111, 115) and out["out"].dtype == torch.float32
    _assert_close_rel(out["out"], main, rtol=1e-4)
    _assert_close_rel(out["aux"], dsn, rtol=1e-4)


def test_whole_network_parity_float64(authors_r50) -> None:
    # the same comparison in float64: backbone, head and auxiliary head agree to rounding
    ref, net = authors_r50
    x = torch.randn(1, 3, 111, 115, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    try:  # float32 -> float64 -> float32 is exact: the shared fixture comes back unchanged
        ref.double()
        net.double()
        with torch.no_grad():
            out = net(x)
            main, dsn = ref(x)
        assert out["out"].dtype == torch.float64
        _assert_close_rel(out["out"], main, rtol=1e-10)
        _assert_close_rel(out["aux"], dsn, rtol=1e-10)
    finally:
        ref.float()
        net.float()


def test_full_key_names_against_the_restatement_depth_101() -> None:
    with torch.device("meta"):  # names and sizes only
        net = GALDNet.official(depth=101, num_classes=FULL_CLASSES)
        ref = RefGALDNet(101, FULL_CLASSES)
    assert sum(p.numel() for p in net.parameters()) == 71_394_790
    converted = official_to_galdnet({"module." + k: v for k, v in ref.state_dict().items()})
    ours = net.state_dict()
    assert sorted(converted) == sorted(ours)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in ours.items()
    }
    # the stem as the authors name it
    assert {k for k in ref.state_dict() if k.startswith("conv1.")} == {
        "conv1.0.weight",
        *(f"conv1.{i}.{n}" for i in (1, 4) for n in _BN),
        "conv1.3.weight",
        "conv1.6.weight",
    }


_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _fake_checkpoint(blocks=(3, 4, 6, 3), classes: int = FULL_CLASSES) -> dict:
    sd = {"conv1.0.weight": torch.zeros(1), "head.bottleneck.3.weight": torch.zeros(classes, 1)}
    for layer, n in enumerate(blocks, start=1):
        for i in range(n):
            sd[f"layer{layer}.{i}.conv1.weight"] = torch.zeros(1)
    return sd


def test_checkpoint_of_another_depth_or_class_count(tmp_path) -> None:
    path = tmp_path / "r101.pth"
    torch.save(_fake_checkpoint((3, 4, 23, 3)), path)
    with pytest.raises(
        ValueError,
        match=r"expected a depth-50 GALD-Net, but .* holds a depth-101 one \(ResNet layers with \[3, 4, 23, 3\] blocks\)",
    ):
        gald.convert.load_official_galdnet(path, depth=50)
    torch.save(_fake_checkpoint(classes=21), path)
    with pytest.raises(
        ValueError, match="expected num_classes=19, but .* classifier for 21 classes"
    ):
        gald.convert.load_official_galdnet(path, num_classes=19)
    torch.save({"state_dict": _fake_checkpoint(), "x": _Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        gald.convert.load_official_galdnet(path)
    torch.save(_fake_checkpoint((3, 4, 5, 3)), path)
    with pytest.raises(
        ValueError, match=r"ResNet layers with \[3, 4, 5, 3\] blocks; expected \[3, 4, 6, 3\]"
    ):
        gald.convert.load_official_galdnet(path)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"depth": "50"}, TypeError, "depth must be an int, got str '50'"),
        ({"depth": 50.0}, TypeError, "depth must be an int, got float 50.0"),
        ({"depth": True}, TypeError, "depth must be an int, got bool True"),
        ({"depth": 34}, ValueError, r"depth must be one of \[50, 101\], got 34"),
        ({"num_classes": "19"}, TypeError, "num_classes must be an int, got str '19'"),
        ({"num_classes": 0}, ValueError, "num_classes must be >= 1, got 0"),
        ({"aux": "no"}, TypeError, "aux must be a bool, got str 'no'"),
    ],
)
def test_load_official_galdnet_checks_its_arguments_before_reading(
    kwargs: dict, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):  # the file is not opened: it does not exist
        gald.convert.load_official_galdnet("no-such-file.pth", **kwargs)


def test_load_official_wants_a_path() -> None:
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        gald.convert.load_official_galdnet(3)  # type: ignore[arg-type]


def test_loading_by_hand_names_the_depth_and_the_stem() -> None:
    with torch.device("meta"):
        ref101 = RefGALDNet(101, 3)
        net50 = GALDNet.official(depth=50, num_classes=3)
        net101 = GALDNet.official(depth=101, num_classes=3)
        plain = GALDNet(3, backbone=DilatedResNet(50, deep_stem=False), aux=False)
    converted = official_to_galdnet({"module." + k: v for k, v in ref101.state_dict().items()})
    with pytest.raises(
        ValueError,
        match=r"^DilatedResNet \(keys backbone\.\*\): the state dict is a ResNet-101 \(23 blocks "
        r"in layer3\); this DilatedResNet has depth=50 .*: build it with depth=101$",
    ):
        net50.load_state_dict(converted)
    with pytest.raises(ValueError, match=r"keys backbone\.\*\): the state dict has the deep stem"):
        plain.load_state_dict(converted, strict=False)
    # a matching checkpoint loads strictly, as before
    assert not any(net101.load_state_dict(converted, assign=True))


def test_strict_loading_lists_missing_unexpected_and_misshaped_keys() -> None:
    from gald.convert import _load_strict

    module = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    del sd["1.num_batches_tracked"]  # old checkpoints lack it: accepted
    _load_strict(module, sd)
    sd["0.weight"] = torch.zeros(3, 1, 1, 1)
    sd["2.weight"] = torch.zeros(1)
    del sd["1.bias"]
    with pytest.raises(
        ValueError,
        match=r"missing keys \[1\.bias\]; unexpected keys \[2\.weight\]; shape mismatches \[0\.weight: expected \(2, 1, 1, 1\), got \(3, 1, 1, 1\)\]",
    ):
        _load_strict(module, sd)


def test_official_to_galdnet_maps_and_lists_unknown_keys() -> None:
    with torch.device("meta"):
        ref = RefGALDNet(50, 3)
    sd = dict(ref.state_dict())
    out = official_to_galdnet(sd)
    assert out["backbone.conv1.6.weight"] is sd["conv1.6.weight"]
    assert out["backbone.layer4.2.bn3.running_var"] is sd["layer4.2.bn3.running_var"]
    assert out["aux_head.cls.bias"] is sd["dsn.4.bias"]
    assert (
        out["head.gald.ld.branch.2.0.weight"] is sd["head.a2block.local_attention.dconv3.0.weight"]
    )
    sd["module.criterion.weight"] = torch.zeros(1)
    sd["fc.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match=r"unknown keys .*\[fc\.weight, module\.criterion\.weight\]"
    ):
        official_to_galdnet(sd)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        official_to_galdnet([("a", torch.zeros(1))])  # type: ignore[arg-type]
    # a gald state dict given to the converter: said so, and the list is capped
    with torch.device("meta"):
        ours = GALDNet.official(depth=50, num_classes=3)
    with pytest.raises(
        ValueError, match=r"\.\.\. and \d+ more\]; it looks like a state dict saved"
    ):
        official_to_galdnet(ours.state_dict())
    with pytest.raises(
        ValueError, match=r"\.\.\. and \d+ more\]; it looks like a state dict saved"
    ):
        official_to_gald(ours.head.state_dict())


_SPLIT = {"conv1.0": "conv1", "conv1.1": "bn1", "conv1.3": "conv2", "conv1.4": "bn2",
          "conv1.6": "conv3", "bn1": "bn3"}  # fmt: skip


def _to_split_layout(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for src, dst in _SPLIT.items():
            if k.startswith(src + "."):
                k = dst + k[len(src) :]
                break
        out[k] = v
    return out


@pytest.mark.parametrize("layout", ["sequential", "split"])
def test_imagenet_weights_in_either_stem_layout(authors_r50, layout: str) -> None:
    ref, net = authors_r50
    backbone = {k: v for k, v in ref.state_dict().items() if not k.startswith(("head.", "dsn."))}
    sd = backbone if layout == "sequential" else _to_split_layout(backbone)
    if layout == "split":
        assert "conv2.weight" in sd and "bn3.running_var" in sd and "conv1.0.weight" not in sd
    sd = {"module." + k: v for k, v in sd.items()}
    sd["module.fc.weight"], sd["module.fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    mapped = gald.convert.imagenet_to_backbone(sd)
    # exactly the backbone's keys and shapes (what a strict load checks), with the right tensors
    expected = net.backbone.state_dict()
    assert sorted(mapped) == sorted(expected)
    assert all(mapped[k].shape == expected[k].shape for k in expected)
    assert all(mapped[k] is backbone[k] for k in backbone)


def test_imagenet_bad_layouts() -> None:
    sd = {"conv1.0.weight": torch.zeros(1), "conv2.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="mixes the two deep-stem layouts"):
        gald.convert.imagenet_to_backbone(sd)
    sd = {
        "conv1.weight": torch.zeros(1),
        "layer1.0.conv1.weight": torch.zeros(1),
        "avgpool.x": torch.zeros(1),
    }
    with pytest.raises(
        ValueError, match=r"unknown keys in the ImageNet state dict: \[avgpool\.x\]"
    ):
        gald.convert.imagenet_to_backbone(sd)


# --------------------------------------------------------------------------- layouts named


def _resnet_d(shortcut: bool = True, stem: bool = True) -> dict[str, torch.Tensor]:
    """timm's ``resnet50d`` layout by hand (timm is not installed in CI): a parameter-free
    average pool at ``downsample.0``, so the shortcut conv is ``downsample.1`` and its norm
    ``downsample.2``; a deep stem 3->32, 32->32, 32->64 (``bn1`` and ``layer1`` 64 wide)."""
    with torch.device("meta"):
        sd = dict(DilatedResNet(50).state_dict())
        if shortcut:
            sd = {
                re.sub(r"\.downsample\.(\d)\.", lambda m: f".downsample.{int(m[1]) + 1}.", k): v
                for k, v in sd.items()
            }
        if stem:
            for name, shape in (("conv1.0", (32, 3)), ("conv1.3", (32, 32)), ("conv1.6", (64, 32))):
                sd[f"{name}.weight"] = torch.empty(*shape, 3, 3)
            for name, width in (("conv1.1", 32), ("conv1.4", 32), ("bn1", 64)):
                for leaf in ("weight", "bias", "running_mean", "running_var"):
                    sd[f"{name}.{leaf}"] = torch.empty(width)
            sd["layer1.0.conv1.weight"] = torch.empty(64, 64, 1, 1)
            sd["layer1.0.downsample.1.weight" if shortcut else "layer1.0.downsample.0.weight"] = (
                torch.empty(256, 64, 1, 1)
            )
        sd["fc.weight"], sd["fc.bias"] = torch.empty(1000, 2048), torch.empty(1000)
    return sd


def test_resnet_d_imagenet_weights_are_named() -> None:
    sd = _resnet_d()
    assert "layer1.0.downsample.2.running_mean" in sd and "layer1.0.downsample.0.weight" not in sd
    expected = (
        r"the ResNet-D layout \(avg-pool shortcut, 32-wide stem\) of timm's resnet50d / "
        r"resnet101d, which DilatedResNet does not implement; expected the GALD-Net authors' "
        r"layout: a conv shortcut \(downsample\.0 the 1x1 conv, downsample\.1 its norm\) and a "
        r"deep stem 64/64/128 wide"
    )
    with pytest.raises(
        ValueError,
        match=r"^the state dict has an average-pool shortcut \(layer1\.0\.downsample\.1\.weight: "
        r"the conv at downsample\.1, its norm at downsample\.2\) and a deep stem 32/32/64 wide "
        r"\(conv1\.0, conv1\.3, conv1\.6\): " + expected,
    ):
        gald.convert.imagenet_to_backbone({"module." + k: v for k, v in sd.items()})
    # loaded directly (its keys are the authors' names otherwise): the same, not torch's list
    del sd["fc.weight"], sd["fc.bias"]
    with torch.device("meta"):
        net = GALDNet.official(depth=50, num_classes=3)
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"^DilatedResNet: the state dict has .*" + expected):
            net.backbone.load_state_dict(sd, strict=strict)
    with pytest.raises(ValueError, match=r"^DilatedResNet \(keys backbone\.\*\): .*ResNet-D"):
        net.load_state_dict({f"backbone.{k}": v for k, v in sd.items()}, strict=False)
    # the avg-pool shortcut alone, and the 32-wide stem alone (timm's resnet50c)
    with pytest.raises(ValueError, match=r"has an average-pool shortcut .*\): the ResNet-D"):
        gald.convert.imagenet_to_backbone(_resnet_d(stem=False))
    with pytest.raises(
        ValueError,
        match=r"^the state dict has a deep stem 32/32/64 wide \(conv1\.0, conv1\.3, conv1\.6\): "
        r"the ResNet-C stem \(32-wide\) of timm's resnet50c",
    ):
        gald.convert.imagenet_to_backbone(_resnet_d(shortcut=False))
    # and in the split layout of other code bases (conv1, conv2, conv3)
    split = _to_split_layout({k: v for k, v in _resnet_d().items()})
    with pytest.raises(ValueError, match=r"deep stem 32/32/64 wide \(conv1, conv2, conv3\)"):
        gald.convert.imagenet_to_backbone(split)


def test_unconverted_authors_checkpoint_loaded_by_hand_is_named() -> None:
    with torch.device("meta"):
        ref = RefGALDNet(50, 3)
        net = GALDNet.official(depth=50, num_classes=3)
    sd = ref.state_dict()
    for prefix, first in (("", "conv1.0.weight"), ("module.", "module.conv1.0.weight")):
        for strict in (True, False):  # strict=False would load a few head keys silently
            with pytest.raises(
                ValueError,
                match=rf"^GALDNet: the state dict has the GALD-Net authors' layout \('{first}': "
                r"the backbone at the top level, without the 'backbone\.' prefix.*; convert it "
                r"with gald\.convert\.official_to_galdnet\(state_dict\), or build and load the "
                r"network from the file with gald\.convert\.load_official_galdnet\(path\)$",
            ) as err:
                net.load_state_dict({prefix + k: v for k, v in sd.items()}, strict=strict)
            assert len(str(err.value)) < 400  # torch's own message: some 20,000 characters
    # a backbone alone, without the prefix
    backbone = {k: v for k, v in sd.items() if not k.startswith(("head.", "dsn."))}
    with pytest.raises(ValueError, match=r"holds a backbone alone \('conv1\.0\.weight'.*backbone"):
        net.load_state_dict(backbone)
    # converted, it loads
    assert not any(net.load_state_dict(official_to_galdnet(sd), assign=True))


def test_checkpoint_without_the_auxiliary_head(authors_r50, monkeypatch) -> None:
    ref, _ = authors_r50
    no_dsn = {k: v for k, v in ref.state_dict().items() if not k.startswith("dsn.")}
    files = {"GALD_res50_no_dsn.pth": no_dsn, "GALD_res50.pth": dict(ref.state_dict())}
    monkeypatch.setattr(gald.convert, "load_official", lambda path: dict(files[path]))
    net = gald.convert.load_official_galdnet("GALD_res50_no_dsn.pth").eval()  # read: no aux
    assert net.aux_head is None and "aux=False" in repr(net)
    x = torch.randn(1, 3, 111, 113, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = net(x)
        main = ref.head(ref.features(x)[1])
    assert set(out) == {"out"}
    _assert_close_rel(out["out"], upsample_align_corners(main, (111, 113)), rtol=1e-4)
    with pytest.raises(
        ValueError,
        match=r"expected a GALD-Net with the auxiliary head \(aux=True\), but "
        r"'GALD_res50_no_dsn\.pth' has no dsn\.\* keys; pass aux=False, or leave aux out",
    ):
        gald.convert.load_official_galdnet("GALD_res50_no_dsn.pth", aux=True)
    # aux=False on a checkpoint with dsn.*: built without the head, its weights left out
    lean = gald.convert.load_official_galdnet("GALD_res50.pth", aux=False)
    assert lean.aux_head is None
    assert sum(p.numel() for p in lean.parameters()) == 52_402_662 - 4_729_875
    # by hand: official_to_galdnet(..., aux=False) and GALDNet.official(..., aux=False)
    converted = official_to_galdnet(ref.state_dict(), aux=False)
    assert not any(k.startswith("aux_head.") for k in converted)
    with torch.device("meta"):
        with_aux = GALDNet.official(depth=50, num_classes=FULL_CLASSES)
        without = GALDNet.official(depth=50, num_classes=FULL_CLASSES, aux=False)
    assert not any(without.load_state_dict(official_to_galdnet(no_dsn), assign=True))
    with pytest.raises(
        ValueError,
        match=r"^GALDNet: the state dict has no auxiliary head \(no aux_head\.\* keys\), but this "
        r"GALDNet has one; build it with aux=False \(GALDNet\.official\(\.\.\., aux=False\)",
    ):
        with_aux.load_state_dict(converted)
    with pytest.raises(
        ValueError,
        match=r"has an auxiliary head \(aux_head\.\* keys\), but .* built with aux=False",
    ):
        without.load_state_dict(official_to_galdnet(ref.state_dict()))
    with pytest.raises(TypeError, match="aux must be a bool, got int 1"):
        official_to_galdnet(no_dsn, aux=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="aux must be a bool, got str 'no'"):
        GALDNet.official(aux="no")  # type: ignore[arg-type]


def test_head_only_checkpoint_is_named(tmp_path) -> None:
    head_only = {k: v for k, v in _reference(0).state_dict().items() if k.startswith("head.")}
    message = (
        r"has no backbone keys \(conv1\.\*, bn1\.\*, layer1\.\*-layer4\.\*\), only head\.\* "
        r"and dsn\.\* ones: it looks like a head-only checkpoint; convert it with "
        r"gald\.convert\.official_to_gald\(state_dict\)"
    )
    with pytest.raises(ValueError, match=r"^the state dict " + message):
        official_to_galdnet({"module." + k: v for k, v in head_only.items()})
    path = tmp_path / "head.pth"
    torch.save({"state_dict": head_only}, path)
    with pytest.raises(ValueError, match=r"^'.*head\.pth' " + message) as err:
        gald.convert.load_official_galdnet(path)
    assert "[0, 0, 0, 0]" not in str(err.value)
    with pytest.raises(ValueError, match="^the state dict is empty; expected the authors'"):
        official_to_galdnet({})
    head_sd, _ = official_to_gald(head_only)  # where the message points: it converts
    assert head_sd


def test_load_official_unwraps_a_model_key(tmp_path) -> None:
    state = {"head.conva.0.weight": torch.zeros(1)}
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "epoch": torch.tensor(3)}, path)
    assert list(load_official(path)) == list(state)
