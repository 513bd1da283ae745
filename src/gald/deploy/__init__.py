"""Deployment helpers: ONNX export to standard operators, checked with onnxruntime.

``torch.compile`` and ``torch.export`` need no helper: every gald layer compiles with
``fullgraph=True`` and exports as it is (the deployment tests check each layer; see the
deployment guide). ONNX export gets one, because a file is only useful once it is known to hold
standard operators only and to agree with eager PyTorch.
"""

from ._onnx import (
    DEFAULT_OPSET,
    MIN_OPSET,
    STANDARD_DOMAINS,
    export_onnx,
    onnx_custom_domains,
    verify_onnx,
)

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "STANDARD_DOMAINS",
    "export_onnx",
    "onnx_custom_domains",
    "verify_onnx",
]
