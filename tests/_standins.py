"""Stand-ins with the structure of third-party segmentation models (not installed in CI).

Each reproduces the module tree a recipe touches — names, widths, the pooling branch that
changes the width, ``nn.Sequential`` indices — with a tiny backbone, so that ``gald.wrap`` and
the recipes of the docs meet what they meet in the real packages:

- torchvision ``deeplabv3_resnet50`` / ``fcn_resnet50`` (``model.backbone`` returns
  ``{"out": layer4, "aux": layer3}``, ``model.classifier`` is a ``DeepLabHead`` / ``FCNHead``),
- segmentation-models-pytorch ``DeepLabV3`` (``model.decoder.aspp``) and ``PSPNet``
  (``model.decoder.psp``, a pyramid pooling that concatenates its input: 128 -> 256),
- timm ``create_model(..., features_only=True)`` (returns a list of features, deepest last).

:func:`install` puts them into ``sys.modules`` as ``torchvision``, ``segmentation_models_pytorch``
and ``timm`` for the docs-snippet test.
"""

from __future__ import annotations

import sys
import types
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def _cbr(cin: int, cout: int, k: int = 3, dilation: int = 1) -> list[nn.Module]:
    pad = dilation * (k // 2)
    return [
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]


class TinyBackbone(nn.Module):
    """Output stride 8: ``{"aux": (B, c3, H/8, W/8), "out": (B, c4, H/8, W/8)}``."""

    def __init__(self, c3: int = 1024, c4: int = 2048, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            *_cbr(3, width),
            nn.MaxPool2d(2, ceil_mode=True),
            *_cbr(width, width),
            nn.MaxPool2d(2, ceil_mode=True),
            *_cbr(width, width),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        self.layer3 = nn.Sequential(*_cbr(width, c3, 1))
        self.layer4 = nn.Sequential(*_cbr(c3, c4, 1))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        c3 = self.layer3(self.stem(x))
        return OrderedDict(aux=c3, out=self.layer4(c3))


# ---- torchvision.models.segmentation -------------------------------------------------------


class ASPPConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, dilation: int) -> None:
        super().__init__(*_cbr(cin, cout, 3, dilation))


class ASPPPooling(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """torchvision's ASPP: 1x1, three dilated 3x3, image pooling; concat; 1x1 projection."""

    def __init__(self, in_channels: int, atrous_rates: tuple[int, ...], out_channels: int = 256):
        super().__init__()
        mods: list[nn.Module] = [nn.Sequential(*_cbr(in_channels, out_channels, 1))]
        mods += [ASPPConv(in_channels, out_channels, r) for r in atrous_rates]
        mods.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(mods)
        self.project = nn.Sequential(
            *_cbr(len(self.convs) * out_channels, out_channels, 1), nn.Dropout(0.5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(
            ASPP(in_channels, (12, 24, 36)), *_cbr(256, 256), nn.Conv2d(256, num_classes, 1)
        )


class FCNHead(nn.Sequential):
    def __init__(self, in_channels: int, channels: int) -> None:
        inter = in_channels // 4
        super().__init__(*_cbr(in_channels, inter), nn.Dropout(0.1), nn.Conv2d(inter, channels, 1))


class SegModel(nn.Module):
    """torchvision's ``_SimpleSegmentationModel``: a dict with "out" (and "aux")."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module, aux: nn.Module | None):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        size = x.shape[-2:]
        out = {
            "out": F.interpolate(
                self.classifier(feats["out"]), size=size, mode="bilinear", align_corners=False
            )
        }
        if self.aux_classifier is not None:
            out["aux"] = F.interpolate(
                self.aux_classifier(feats["aux"]), size=size, mode="bilinear", align_corners=False
            )
        return out


_IMAGENET = "IMAGENET1K_V1"  # torchvision's default backbone weights: a download


def _offline(weights: object, weights_backbone: object) -> None:
    # torchvision downloads ImageNet backbone weights unless weights_backbone=None, even with
    # weights=None; a recipe that forgets it fails offline, so the stand-in fails too
    if weights is not None or weights_backbone is not None:
        raise RuntimeError(
            "stand-in for torchvision: this call would download weights "
            f"(weights={weights!r}, weights_backbone={weights_backbone!r})"
        )


def deeplabv3_resnet50(
    *,
    weights=None,
    weights_backbone=_IMAGENET,
    num_classes: int = 21,
    aux_loss: bool | None = None,
    **_: object,
) -> SegModel:
    _offline(weights, weights_backbone)
    aux = FCNHead(1024, num_classes) if aux_loss else None
    return SegModel(TinyBackbone(), DeepLabHead(2048, num_classes), aux)


def fcn_resnet50(
    *,
    weights=None,
    weights_backbone=_IMAGENET,
    num_classes: int = 21,
    aux_loss: bool | None = None,
    **_: object,
) -> SegModel:
    _offline(weights, weights_backbone)
    aux = FCNHead(1024, num_classes) if aux_loss else None
    return SegModel(TinyBackbone(), FCNHead(2048, num_classes), aux)


# ---- segmentation_models_pytorch ------------------------------------------------------------


class _SmpEncoder(nn.Module):
    def __init__(self, out: int) -> None:
        super().__init__()
        self.body = TinyBackbone(c3=out // 2, c4=out)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x).values())


class _SmpDeepLabV3Decoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int = 256) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, (12, 24, 36), out_channels)
        self.block = nn.Sequential(*_cbr(out_channels, out_channels))

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return self.block(self.aspp(features[-1]))


class PSPBlock(nn.Module):
    def __init__(self, cin: int, cout: int, pool_size: int) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(pool_size), *_cbr(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return F.interpolate(self.pool(x), size=(h, w), mode="bilinear", align_corners=True)


class PSPModule(nn.Module):
    """smp's pyramid pooling: four pooled branches of ``C/4``, concatenated with the input."""

    def __init__(self, in_channels: int, sizes: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [PSPBlock(in_channels, in_channels // len(sizes), s) for s in sizes]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([block(x) for block in self.blocks] + [x], dim=1)


class _SmpPSPDecoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int = 512) -> None:
        super().__init__()
        self.psp = PSPModule(in_channels)
        self.conv = nn.Sequential(*_cbr(in_channels * 2, out_channels, 1))

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return self.conv(self.psp(features[-1]))


class _SmpModel(nn.Module):
    def __init__(
        self, encoder: nn.Module, decoder: nn.Module, dec_out: int, classes: int, upsampling: int
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.segmentation_head = nn.Sequential(
            nn.Conv2d(dec_out, classes, 3, padding=1),
            nn.Upsample(scale_factor=upsampling, mode="bilinear"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmentation_head(self.decoder(*self.encoder(x)))


def _smp_offline(encoder_weights: object) -> None:
    # smp downloads ImageNet encoder weights unless encoder_weights=None
    if encoder_weights is not None:
        raise RuntimeError(
            f"stand-in for smp: encoder_weights={encoder_weights!r} would download weights"
        )


def DeepLabV3(
    encoder_name: str = "resnet34", *, encoder_weights="imagenet", classes: int = 1, **_: object
) -> _SmpModel:
    _smp_offline(encoder_weights)
    return _SmpModel(_SmpEncoder(512), _SmpDeepLabV3Decoder(512, 256), 256, classes, 8)


def PSPNet(
    encoder_name: str = "resnet34",
    *,
    encoder_weights="imagenet",
    encoder_depth: int = 3,
    psp_out_channels: int = 512,
    classes: int = 1,
    **_: object,
) -> _SmpModel:
    _smp_offline(encoder_weights)
    # resnet34 at depth 3 gives a 128-channel feature: the pyramid maps 128 -> 256
    return _SmpModel(
        _SmpEncoder(128), _SmpPSPDecoder(128, psp_out_channels), psp_out_channels, classes, 8
    )


# ---- timm ----------------------------------------------------------------------------------


class _TimmFeatures(nn.Module):
    def __init__(self, out_indices: tuple[int, ...] = (3, 4)) -> None:
        super().__init__()
        self.body = TinyBackbone()
        self.out_indices = out_indices
        chans = {3: 1024, 4: 2048}
        self.feature_info = types.SimpleNamespace(channels=lambda: [chans[i] for i in out_indices])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(x)
        both = {3: feats["aux"], 4: feats["out"]}
        return [both[i] for i in self.out_indices]


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    features_only: bool = False,
    out_indices: tuple[int, ...] = (3, 4),
    output_stride: int = 8,
    **_: object,
) -> nn.Module:
    if not features_only:
        raise NotImplementedError("the stand-in only provides features_only=True")
    return _TimmFeatures(tuple(out_indices))


def install() -> None:
    """Register the stand-ins as the ``torchvision``, ``segmentation_models_pytorch`` and
    ``timm`` modules (for code written against the real packages)."""
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    seg = types.ModuleType("torchvision.models.segmentation")
    seg.deeplabv3_resnet50 = deeplabv3_resnet50  # type: ignore[attr-defined]
    seg.fcn_resnet50 = fcn_resnet50  # type: ignore[attr-defined]
    models.segmentation = seg  # type: ignore[attr-defined]
    tv.models = models  # type: ignore[attr-defined]
    smp = types.ModuleType("segmentation_models_pytorch")
    smp.DeepLabV3 = DeepLabV3  # type: ignore[attr-defined]
    smp.PSPNet = PSPNet  # type: ignore[attr-defined]
    timm = types.ModuleType("timm")
    timm.create_model = create_model  # type: ignore[attr-defined]
    sys.modules.update(
        {
            "torchvision": tv,
            "torchvision.models": models,
            "torchvision.models.segmentation": seg,
            "segmentation_models_pytorch": smp,
            "timm": timm,
        }
    )
