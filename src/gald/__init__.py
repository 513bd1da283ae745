"""gald: Global Aggregation then Local Distribution (Li et al., BMVC 2019) as PyTorch layers.

Public API::

    gald.LocalDistribution   the LD gate
    gald.GALD                GA at half resolution, then LD, around any context module
    gald.wrap                replace a model's context module by a GALD around it, in place
    gald.GALDHead, gald.AuxHead
    gald.create_ga, gald.list_ga, gald.get_ga_class
    gald.register_ga, gald.unregister_ga, gald.registered   the GA registry
    gald.ga                  the global-aggregation zoo
    gald.ops.ld_modulate     the fused modulation op
    gald.ld_statistics       gate statistics of every LD in a model
    gald.fuse, gald.fuse_conv_bn   fold eval-mode BatchNorms into the preceding convs
    gald.losses.OhemCrossEntropy
    gald.convert             the authors' checkpoint conversion
    gald.models              DilatedResNet, GALDNet (the whole network), slide_inference
    gald.deploy              ONNX export and verification
    gald.testing             the layer contract for your own GA's tests (import it explicitly)
"""

from . import convert, deploy, ga, losses, models, ops
from ._fuse import fuse, fuse_conv_bn
from ._version import __version__
from ._wrap import wrap
from .block import GALD
from .head import AuxHead, GALDHead
from .ld import LocalDistribution
from .losses import OhemCrossEntropy
from .registry import create_ga, get_ga_class, list_ga, register_ga, registered, unregister_ga
from .stats import ld_statistics

__all__ = [
    "GALD",
    "AuxHead",
    "GALDHead",
    "LocalDistribution",
    "OhemCrossEntropy",
    "__version__",
    "convert",
    "create_ga",
    "deploy",
    "fuse",
    "fuse_conv_bn",
    "ga",
    "get_ga_class",
    "ld_statistics",
    "list_ga",
    "losses",
    "models",
    "ops",
    "register_ga",
    "registered",
    "unregister_ga",
    "wrap",
]
