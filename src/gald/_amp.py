"""Autocast helpers: run numerically sensitive regions (attention logits, softmax) in fp32."""

from __future__ import annotations

import contextlib

import torch


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Disable autocast for ``device_type`` if it is active (a no-op, and no graph node, if not).

    Inside the region, cast the operands to fp32 yourself and cast the result back after.
    """
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
