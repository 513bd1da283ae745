"""slide_inference against a whole-image forward and against a slow, explicit loop over crops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gald
from _helpers import assert_close as _assert_close
from _official_reference import upsample_align_corners
from gald.models import GALDNet, slide_inference

K = 3


class Net(nn.Module):
    """Context-dependent, not flip-symmetric; logits at full (or half) resolution; records calls."""

    def __init__(self, *, stride: int = 1, returns: str = "dict") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=stride, padding=1)
        self.cls = nn.Conv2d(4, K, 3, padding=2, dilation=2)
        self.returns = returns
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor):
        self.shapes.append(tuple(x.shape))
        y = self.cls(torch.tanh(self.conv(x)))
        if self.returns == "dict":
            return {"out": y, "aux": y[:, :1]}
        if self.returns == "list":
            return [y, y]
        return y


def _logits(out) -> torch.Tensor:
    if isinstance(out, dict):
        return out["out"]
    return out[0] if isinstance(out, list) else out


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    if size <= crop:
        return [0]
    return [*range(0, size - crop, stride), size - crop]


def slow_slide(model, images, crop, stride, flip=False) -> torch.Tensor:
    """One window at a time, padding and upsampling spelled out, sums and counts per pixel."""
    b, c, height, width = images.shape
    total = torch.zeros(b, K, height, width, dtype=torch.float64)
    count = torch.zeros(height, width, dtype=torch.float64)
    for y in _window_starts(height, crop[0], stride[0]):
        for x in _window_starts(width, crop[1], stride[1]):
            piece = images[:, :, y : y + crop[0], x : x + crop[1]]
            h, w = piece.shape[-2:]
            tile = torch.zeros(b, c, *crop, dtype=images.dtype)
            tile[:, :, :h, :w] = piece
            views = [(tile, False), (tile.flip(-1), True)] if flip else [(tile, False)]
            acc = torch.zeros(b, K, *crop, dtype=torch.float64)
            for view, flipped in views:
                logits = _logits(model(view)).double()
                if logits.shape[-2:] != crop:
                    logits = upsample_align_corners(logits, crop)
                acc += logits.flip(-1) if flipped else logits
            acc /= len(views)
            for i in range(h):
                for j in range(w):
                    total[:, :, y + i, x + j] += acc[:, :, i, j]
                    count[y + i, x + j] += 1
    assert count.min() >= 1
    return total / count


def test_crop_equal_to_the_image_is_the_whole_image_forward() -> None:
    net = Net()
    x = torch.randn(2, 3, 11, 14)
    got = slide_inference(net, x, crop_size=(11, 14), stride=5, num_classes=K)
    assert got.shape == (2, K, 11, 14)
    _assert_close(got, net(x)["out"], rtol=0, atol=0)


def test_galdnet_whole_image() -> None:
    class Backbone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.b = nn.Conv2d(8, 16, 3, padding=1)

        def forward(self, x):
            c3 = torch.relu(self.a(x))
            return c3, torch.relu(self.b(c3))

    net = GALDNet(K, backbone=Backbone(), head={"channels": 16}).eval()
    x = torch.randn(1, 3, 20, 18)
    got = slide_inference(net, x, crop_size=(20, 18), stride=(10, 9), num_classes=K)
    with torch.no_grad():
        _assert_close(got, net(x)["out"], rtol=0, atol=0)
    assert not got.requires_grad


@pytest.mark.parametrize("size", [(7, 9), (12, 5), (4, 4)])
def test_smaller_than_the_crop_is_padded_then_cropped_back(size: tuple[int, int]) -> None:
    net = Net()
    x = torch.randn(1, 3, *size)
    got = slide_inference(net, x, crop_size=12, stride=8, num_classes=K)
    padded = torch.zeros(1, 3, 12, 12)
    padded[:, :, : size[0], : size[1]] = x
    assert got.shape == (1, K, *size)
    _assert_close(got, net(padded)["out"][:, :, : size[0], : size[1]])
    assert set(net.shapes) == {(1, 3, 12, 12)}


@pytest.mark.parametrize("returns", ["dict", "list", "tensor"])
def test_overlapping_windows_equal_the_slow_loop(returns: str) -> None:
    net = Net(returns=returns)
    x = torch.randn(2, 3, 19, 23, dtype=torch.float64)
    net = net.double()
    got = slide_inference(net, x, crop_size=(8, 10), stride=(5, 7), num_classes=K)
    net.shapes.clear()
    expected = slow_slide(net, x, (8, 10), (5, 7))
    _assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_memory_is_one_crop_batch_at_a_time() -> None:
    net = Net()
    x = torch.randn(2, 3, 30, 17)
    slide_inference(net, x, crop_size=(9, 8), stride=(6, 4), num_classes=K, flip=True)
    windows = len(_window_starts(30, 9, 6)) * len(_window_starts(17, 8, 4))
    assert len(net.shapes) == 2 * windows  # each window, then its mirror
    assert set(net.shapes) == {(2, 3, 9, 8)}


def test_low_resolution_logits_are_upsampled_per_crop() -> None:
    net = Net(stride=2).double()
    x = torch.randn(1, 3, 17, 21, dtype=torch.float64)
    got = slide_inference(net, x, crop_size=9, stride=6, num_classes=K)
    _assert_close(got, slow_slide(net, x, (9, 9), (6, 6)), rtol=1e-12, atol=1e-12)


def test_flip_equals_the_slow_loop_and_differs_from_no_flip() -> None:
    net = Net().double()
    x = torch.randn(1, 3, 16, 15, dtype=torch.float64)
    got = slide_inference(net, x, crop_size=(10, 9), stride=(4, 5), num_classes=K, flip=True)
    _assert_close(got, slow_slide(net, x, (10, 9), (4, 5), flip=True), rtol=1e-12, atol=1e-12)
    plain = slide_inference(net, x, crop_size=(10, 9), stride=(4, 5), num_classes=K)
    assert (got - plain).abs().max() > 1e-3


def test_multi_scale_is_the_mean_of_resized_slides() -> None:
    net = Net().double()
    x = torch.randn(1, 3, 14, 18, dtype=torch.float64)
    scales = (0.5, 1.0, 1.25)
    got = slide_inference(net, x, crop_size=8, stride=6, num_classes=K, scales=scales)
    parts = []
    for s in scales:
        size = (round(14 * s), round(18 * s))
        scaled = upsample_align_corners(x, size)
        parts.append(upsample_align_corners(slow_slide(net, scaled, (8, 8), (6, 6)), (14, 18)))
    _assert_close(got, sum(parts) / 3, rtol=1e-10, atol=1e-10)


@given(
    height=st.integers(1, 20),
    width=st.integers(1, 20),
    crop_h=st.integers(1, 9),
    crop_w=st.integers(1, 9),
    data=st.data(),
)
def test_property_any_sizes_equal_the_slow_loop(height, width, crop_h, crop_w, data) -> None:
    stride = (data.draw(st.integers(1, crop_h)), data.draw(st.integers(1, crop_w)))
    net = Net(returns="tensor").double()
    x = torch.randn(1, 3, height, width, dtype=torch.float64)
    got = slide_inference(net, x, crop_size=(crop_h, crop_w), stride=stride, num_classes=K)
    expected = slow_slide(net, x, (crop_h, crop_w), stride)
    assert got.shape == (1, K, height, width)
    _assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_half_precision_logits_accumulate_in_float32() -> None:
    conv = nn.Conv2d(3, K, 3, padding=1)
    x = torch.randn(1, 3, 10, 10)
    got = slide_inference(lambda t: conv(t).bfloat16(), x, crop_size=6, stride=4, num_classes=K)
    assert got.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"stride": 9},
            ValueError,
            r"stride must be at most crop_size .* stride=\(9, 9\) and crop_size=\(8, 8\)",
        ),
        ({"stride": (4, 9)}, ValueError, "stride must be at most crop_size"),
        ({"crop_size": 0}, ValueError, "crop_size must be >= 1, got 0"),
        ({"crop_size": (8, -1)}, ValueError, r"crop_size\[1\] must be >= 1, got -1"),
        ({"stride": 0}, ValueError, "stride must be >= 1, got 0"),
        (
            {"crop_size": (8, 8, 8)},
            ValueError,
            r"crop_size must be an int or a pair .* got 3 items",
        ),
        ({"stride": 2.5}, TypeError, "stride must be an int, got float 2.5"),
        ({"num_classes": 0}, ValueError, "num_classes must be >= 1, got 0"),
        ({"num_classes": 4}, ValueError, r"num_classes=4 but the model returned 3 channels"),
        ({"scales": ()}, ValueError, "scales must not be empty"),
        (
            {"scales": (1.0, 0.0)},
            ValueError,
            r"scales must hold positive numbers, got \[1.0, 0.0\]",
        ),
        ({"scales": (float("inf"),)}, ValueError, r"scales\[0\] must be a finite number, got inf"),
        (
            {"scales": (1.0, float("nan"))},
            ValueError,
            r"scales\[1\] must be a finite number, got nan",
        ),
        (
            {"scales": (-float("inf"),)},
            ValueError,
            r"scales\[0\] must be a finite number, got -inf",
        ),
        ({"scales": ("1",)}, TypeError, "scales\\[0\\] must be a float, got str"),
        ({"scales": (10**400,)}, ValueError, "scales\\[0\\] must be a finite number, got an int"),
        ({"scales": {1.0}}, TypeError, "scales must be a sequence of positive floats, got set"),
        ({"crop_size": (8, True)}, TypeError, r"crop_size\[1\] must be an int, got bool"),
        ({"crop_size": {8, 9}}, TypeError, "crop_size must be a sequence of two ints"),
        (
            {"crop_size": torch.tensor([True, True])},
            TypeError,
            r"crop_size\[0\] must be an int, got bool",
        ),
        ({"stride": torch.tensor(True)}, TypeError, "stride must be an int, got bool"),
        ({"stride": float("inf")}, TypeError, "stride must be an int, got float inf"),
        ({"flip": 1}, TypeError, "flip must be a bool"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    args = {"crop_size": 8, "stride": 4, "num_classes": K, **kwargs}
    with pytest.raises(error, match=match):
        slide_inference(Net(), torch.randn(1, 3, 10, 10), **args)


def test_bad_images_and_outputs() -> None:
    with pytest.raises(ValueError, match="images must be 4-D"):
        slide_inference(Net(), torch.randn(3, 10, 10), crop_size=8, stride=4, num_classes=K)
    with pytest.raises(ValueError, match=r"images has an empty side: .* got shape \(1, 3, 0, 10\)"):
        slide_inference(Net(), torch.randn(1, 3, 0, 10), crop_size=8, stride=4, num_classes=K)
    with pytest.raises(TypeError, match="images must have a floating dtype"):
        slide_inference(
            Net(), torch.zeros(1, 3, 9, 9, dtype=torch.long), crop_size=8, stride=4, num_classes=K
        )
    with pytest.raises(TypeError, match=r"the model must return logits .* got str"):
        slide_inference(
            lambda t: "logits", torch.randn(1, 3, 9, 9), crop_size=8, stride=4, num_classes=K
        )
    with pytest.raises(TypeError, match=r"a dict with 'out' .* got a dict with keys \['logits'\]"):
        slide_inference(
            lambda t: {"logits": Net()(t)},
            torch.randn(1, 3, 9, 9),
            crop_size=8,
            stride=4,
            num_classes=K,
        )
    with pytest.raises(TypeError, match=r"model must be a callable .* got int"):
        slide_inference(3, torch.randn(1, 3, 9, 9), crop_size=8, stride=4, num_classes=K)  # type: ignore[arg-type]


def test_exported_from_the_package() -> None:
    assert gald.models.slide_inference is slide_inference
    assert set(gald.models.__all__) == {"DilatedResNet", "GALDNet", "slide_inference"}
    assert "models" in gald.__all__


def test_scales_take_numpy_numbers() -> None:
    import numpy as np

    x = torch.randn(1, 3, 10, 10)
    args = {"crop_size": 8, "stride": 4, "num_classes": K}
    want = slide_inference(Net(), x, scales=(1.0, 0.5), **args)
    for scales in ([np.float32(1.0), np.float64(0.5)], np.array([1.0, 0.5])):
        got = slide_inference(Net(), x, scales=scales, **args)
        torch.testing.assert_close(got, want)


def test_sizes_take_numpy_ints() -> None:
    import numpy as np

    x = torch.randn(1, 3, 10, 11)
    want = slide_inference(Net(), x, crop_size=(8, 6), stride=4, num_classes=K)
    for crop, stride in (((np.int64(8), np.int32(6)), np.int64(4)), (np.array([8, 6]), 4)):
        got = slide_inference(Net(), x, crop_size=crop, stride=stride, num_classes=K)
        torch.testing.assert_close(got, want)


def test_a_model_in_train_mode_runs_in_eval_mode_and_keeps_its_flags() -> None:
    model = nn.Sequential(nn.Conv2d(3, K, 3, padding=1), nn.BatchNorm2d(K), nn.Dropout(0.5))
    model[1].running_mean.uniform_(-1, 1)
    model.train()
    model[2].eval()  # a submodule's own flag is kept too
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 10, 12)
    got = slide_inference(model, x, crop_size=8, stride=4, num_classes=K)
    assert model.training and model[1].training and not model[2].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, stats[key]), f"{key} changed"
    want = slide_inference(model.eval(), x, crop_size=8, stride=4, num_classes=K)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_flags_are_restored_when_the_model_raises() -> None:
    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    model = nn.Sequential(Fails()).train()
    with pytest.raises(RuntimeError, match="boom"):
        slide_inference(model, torch.randn(1, 3, 9, 9), crop_size=8, stride=4, num_classes=K)
    assert model.training and model[0].training


@pytest.mark.parametrize(
    ("output", "exc", "pattern"),
    [
        (lambda t: torch.zeros(1, K, 8, 8), ValueError, r"logits for 1 images .* crop batch of 2"),
        (lambda t: torch.zeros(3, K, 8, 8), ValueError, r"logits for 3 images .* crop batch of 2"),
        (lambda t: torch.zeros(2, 8, 8), ValueError, r"got a 3-D tensor of shape \(2, 8, 8\)"),
        (lambda t: [], TypeError, r"got an empty list"),
    ],
)
def test_a_model_output_of_the_wrong_batch_or_rank_is_named(output, exc, pattern) -> None:
    """One row of logits for two images used to be broadcast over both, silently."""
    with pytest.raises(exc, match=pattern):
        slide_inference(output, torch.randn(2, 3, 10, 10), crop_size=8, stride=4, num_classes=K)
