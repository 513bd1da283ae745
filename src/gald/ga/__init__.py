"""Global-aggregation (GA) layers, one variant per file, all registered for ``gald.create_ga``."""

from .aspp import ASPP
from .cgnl import CGNL
from .criss_cross import CrissCrossAttention
from .danet import DualAttention
from .dualgcn import DualGCN
from .ema import EMA
from .gc import GlobalContext
from .glore import GloRe
from .non_local import NonLocal2d
from .psp import PyramidPooling

__all__ = [
    "ASPP",
    "CGNL",
    "EMA",
    "CrissCrossAttention",
    "DualAttention",
    "DualGCN",
    "GloRe",
    "GlobalContext",
    "NonLocal2d",
    "PyramidPooling",
]
