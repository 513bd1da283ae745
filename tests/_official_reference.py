"""A slow, explicit restatement of the authors' GALD-Net (lxtGH/GALD-DGCNet).

Written from the documented behaviour, not copied: parameter names follow the authors' state
dict (the ``conv1`` stem sequence, ``bn1``, ``layer1``-``layer4``, ``head.conva``,
``head.a2block.{down,long_relation,local_attention}``, ``head.convb``, ``head.bottleneck``,
``dsn``) so that their checkpoints load here with ``strict=True``. Every operation is spelled
out the slow way (per-group Python loops, explicit sums, separate upsample and sigmoid, the
double residual written as two additions, per-block dilation tables written out, bilinear
upsampling as explicit interpolation matrices).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _dw(c: int) -> nn.Conv2d:
    # depthwise 3x3, stride 2, *no padding*, bias on: the authors' quirk
    return nn.Conv2d(c, c, 3, stride=2, padding=0, groups=c, bias=True)


class RefCGNL(nn.Module):
    def __init__(self, c: int, inner: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.t = nn.Conv2d(c, inner, 1, bias=False)
        self.p = nn.Conv2d(c, inner, 1, bias=False)
        self.g = nn.Conv2d(c, inner, 1, bias=False)
        self.z = nn.Conv2d(inner, c, 1, groups=groups, bias=False)
        self.gn = nn.GroupNorm(groups, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, p, g = self.t(x), self.p(x), self.g(x)
        width = t.shape[1] // self.groups
        pieces = []
        for k in range(self.groups):
            sl = slice(k * width, (k + 1) * width)
            out_k = torch.empty_like(t[:, sl])
            for b in range(x.shape[0]):
                scalar = (p[b, sl] * g[b, sl]).sum()  # sum over (c, h, w) of the group
                out_k[b] = scalar * t[b, sl]
            pieces.append(out_k)
        y = torch.cat(pieces, dim=1)
        return self.gn(self.z(y)) + x


class RefLocalAtten(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dconv1 = nn.Sequential(_dw(c), nn.BatchNorm2d(c), nn.ReLU())
        self.dconv2 = nn.Sequential(_dw(c), nn.BatchNorm2d(c), nn.ReLU())
        self.dconv3 = nn.Sequential(_dw(c), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.dconv3(self.dconv2(self.dconv1(x)))
        up = F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=True)
        mask = torch.sigmoid(up)
        return x + x * mask


class RefGALDBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.down = nn.Sequential(_dw(c), nn.BatchNorm2d(c), nn.ReLU())
        self.long_relation = RefCGNL(c, c // 2, groups=8)
        self.local_attention = RefLocalAtten(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.long_relation(self.down(x))
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return self.local_attention(y) + y


class RefHead(nn.Module):
    def __init__(self, inplanes: int, interplanes: int, num_classes: int) -> None:
        super().__init__()
        self.conva = nn.Sequential(
            nn.Conv2d(inplanes, interplanes, 3, padding=1, bias=False),
            nn.BatchNorm2d(interplanes),
            nn.ReLU(),
        )
        self.a2block = RefGALDBlock(interplanes)
        self.convb = nn.Sequential(
            nn.Conv2d(interplanes, interplanes, 3, padding=1, bias=False),
            nn.BatchNorm2d(interplanes),
            nn.ReLU(),
        )
        self.bottleneck = nn.Sequential(
            nn.Conv2d(inplanes + interplanes, interplanes, 3, padding=1, bias=False),
            nn.BatchNorm2d(interplanes),
            nn.ReLU(),
            nn.Conv2d(interplanes, num_classes, 1, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convb(self.a2block(self.conva(x)))
        return self.bottleneck(torch.cat([x, y], dim=1))


class RefNet(nn.Module):
    """Head + dsn of GALD-Net, with a stand-in backbone so backbone keys exist in the state dict."""

    def __init__(self, inplanes: int, interplanes: int, num_classes: int, dsn_in: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer4 = nn.Conv2d(4, 4, 1)
        self.head = RefHead(inplanes, interplanes, num_classes)
        self.dsn = nn.Sequential(
            nn.Conv2d(dsn_in, interplanes, 3, padding=1),
            nn.BatchNorm2d(interplanes),
            nn.ReLU(),
            nn.Dropout2d(0.1),
            nn.Conv2d(interplanes, num_classes, 1, bias=True),
        )


def randomise_(
    module: nn.Module, generator: torch.Generator | None = None, *, fan_in: bool = False
) -> nn.Module:
    """Random weights *and* random BN/GN statistics: fresh norms are the identity and hide bugs.

    Conv weights have std 0.3, or ``1/sqrt(fan_in)`` with ``fan_in=True`` (deep networks, where a
    fixed std would overflow after a few dozen layers).
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv1d)):
                std = m.weight[0].numel() ** -0.5 if fan_in else 0.3
                m.weight.normal_(0.0, std, generator=generator)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.3, generator=generator)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5, generator=generator)
                    m.bias.normal_(0.0, 0.3, generator=generator)
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                    m.running_mean.normal_(0.0, 0.3, generator=generator)
                    m.running_var.uniform_(0.5, 2.0, generator=generator)
    return module


# ---------------------------------------------------------------------------------------------
# The whole network: deep-stem dilated ResNet + head + dsn


def upsample_align_corners(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling with ``align_corners=True``, as two explicit interpolation matrices."""

    def matrix(n_in: int, n_out: int) -> torch.Tensor:
        a = torch.zeros(n_out, n_in, dtype=torch.float64)
        for i in range(n_out):
            src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
            lo = int(src)
            hi = min(lo + 1, n_in - 1)
            frac = src - lo
            a[i, lo] += 1.0 - frac
            a[i, hi] += frac
        return a.to(x.dtype)

    rows = matrix(x.shape[-2], size[0])
    cols = matrix(x.shape[-1], size[1])
    return torch.einsum("oh,bchw,pw->bcop", rows, x, cols)


class RefBottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)


# (planes, [(stride, dilation) of every block]) per layer, output stride 8, multi-grid (1, 2, 4)
def _plan(depth: int) -> list[tuple[int, list[tuple[int, int]]]]:
    n3 = {50: 6, 101: 23}[depth]
    return [
        (64, [(1, 1)] * 3),
        (128, [(2, 1)] + [(1, 1)] * 3),
        (256, [(1, 2)] * n3),
        (512, [(1, 4), (1, 8), (1, 16)]),
    ]


class RefGALDNet(nn.Module):
    """The authors' ``GALD_res50`` / ``GALD_res101`` with their parameter names.

    ``forward`` returns ``(main, dsn)`` logits, both upsampled to the input size the way the
    authors' evaluation and loss do (bilinear, ``align_corners=True``).
    """

    def __init__(self, depth: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 128, 3, padding=1, bias=False),
        )
        self.bn1 = nn.BatchNorm2d(128)
        inplanes = 128
        for index, (planes, blocks) in enumerate(_plan(depth), start=1):
            layer = []
            for stride, dilation in blocks:
                layer.append(RefBottleneck(inplanes, planes, stride, dilation))
                inplanes = planes * 4
            setattr(self, f"layer{index}", nn.Sequential(*layer))
        self.head = RefHead(2048, 512, num_classes)
        self.dsn = nn.Sequential(
            nn.Conv2d(1024, 512, 3, padding=1),
            nn.BatchNorm2d(512),
            nn.ReLU(),
            nn.Dropout2d(0.1),
            nn.Conv2d(512, num_classes, 1, bias=True),
        )

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = F.max_pool2d(y, kernel_size=3, stride=2, padding=1, ceil_mode=True)
        y = self.layer2(self.layer1(y))
        c3 = self.layer3(y)
        return c3, self.layer4(c3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = (x.shape[-2], x.shape[-1])
        c3, c4 = self.features(x)
        main = upsample_align_corners(self.head(c4), size)
        return main, upsample_align_corners(self.dsn(c3), size)
