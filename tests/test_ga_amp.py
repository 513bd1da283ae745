"""The float32 regions of the GA layers go through ``gald._amp.autocast_off``, which leaves no
autocast node in an exported graph when autocast is off (``torch.autocast(enabled=False)`` would
leave a ``wrap_with_autocast`` node). Their accuracy under autocast is tested per layer."""

from __future__ import annotations

import pytest
import torch

import gald

C = 16
SMALL: dict[str, dict] = {
    "cgnl": {"groups": 2},
    "ema": {"num_bases": 4},
    "aspp": {"inner_channels": 4, "rates": (1, 2)},
}


@pytest.mark.parametrize("name", gald.list_ga())
def test_no_autocast_node_in_an_exported_graph(name: str) -> None:
    layer = gald.create_ga(name, C, **SMALL.get(name, {})).eval()
    graph = torch.export.export(layer, (torch.randn(1, C, 4, 5),)).graph
    targets = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    assert not [t for t in targets if "autocast" in t], targets


def test_the_check_can_fail() -> None:
    """``torch.autocast(enabled=False)`` itself would leave such a node."""

    class Plain(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", enabled=False):
                return torch.softmax(x, dim=-1)

    graph = torch.export.export(Plain(), (torch.randn(2, 3),)).graph
    assert any("autocast" in str(node.target) for node in graph.nodes)
