"""Distributed training: DDP over GALDHead + AuxHead on 2 CPU processes (gloo), the same with
SyncBatchNorm on CUDA + NCCL, and no collective issued by any layer's forward or backward."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode

import gald

IN4, IN3, INNER, CLASSES = 16, 8, 16, 5  # layer4 / layer3 widths, head width, classes
BATCH, H, W = 2, 9, 11  # per rank; labels at twice the feature size
STEPS = 3


class _Heads(nn.Module):
    """The two heads of the GALD recipe on (layer4, layer3) features."""

    def __init__(self) -> None:
        super().__init__()
        self.main = gald.GALDHead(IN4, CLASSES, channels=INNER)
        self.aux = gald.AuxHead(IN3, CLASSES, channels=INNER)

    def forward(self, x4: torch.Tensor, x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.main(x4), self.aux(x3)


def _loss(
    logits: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor, ohem: nn.Module
) -> torch.Tensor:
    size = target.shape[-2:]
    main, aux = (F.interpolate(t, size=size, mode="bilinear", align_corners=True) for t in logits)
    return ohem(main, target) + 0.4 * F.cross_entropy(aux, target, ignore_index=255)


def _learnable_target(x4: torch.Tensor) -> torch.Tensor:
    """Labels that a fixed linear map of the feature predicts (the same map on every rank), so the
    averaged gradients of the ranks agree and 3 SGD steps reliably lower every rank's loss
    (random labels lower it by 0.3-1.6 %, with an occasional increase on one rank)."""
    proj = torch.randn(CLASSES, IN4, generator=torch.Generator().manual_seed(7))
    score = torch.einsum("kc,bchw->bkhw", proj, x4)
    return F.interpolate(score, scale_factor=2, mode="nearest").argmax(1)


def _train_worker(
    rank: int, world: int, init_file: str, out_dir: str, backend: str, sync_bn: bool
) -> None:
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # a forked rank: one intra-op thread each, as DataLoader workers do
        torch.set_num_threads(1)
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        torch.manual_seed(rank)  # a different init per rank: DDP must broadcast rank 0's
        model: nn.Module = _Heads()
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(device).train()
        ddp = DDP(model, device_ids=[rank] if device.type == "cuda" else None)
        gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
        x4 = torch.randn(BATCH, IN4, H, W, generator=gen)
        x3 = torch.randn(BATCH, IN3, H, W, generator=gen)
        target = _learnable_target(x4)
        target[:, :2] = 255  # a few ignored rows
        x4, x3, target = x4.to(device), x3.to(device), target.to(device)
        ohem = gald.OhemCrossEntropy(thresh=0.7, min_kept=64)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        losses = []
        for _ in range(STEPS):
            loss = _loss(ddp(x4, x3), target, ohem)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            final = _loss(ddp(x4, x3), target, ohem).item()
        params = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
        torch.save(
            {"losses": losses, "final": final, "params": params},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _run_ddp(tmp_path: Path, *, world: int, backend: str, sync_bn: bool) -> list[dict[str, Any]]:
    # CPU ranks are forked (a spawned rank re-imports torch, seconds per process); CUDA ranks
    # must be spawned (CUDA cannot be re-initialised in a forked child)
    mp.start_processes(
        _train_worker,
        args=(world, str(tmp_path / "init"), str(tmp_path), backend, sync_bn),
        nprocs=world,
        join=True,
        start_method="spawn" if backend == "nccl" else "fork",
    )
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _check_ddp_results(results: list[dict[str, Any]]) -> None:
    first = results[0]["params"]
    for rank, result in enumerate(results):
        assert len(result["losses"]) == STEPS
        assert result["final"] < result["losses"][0], (
            f"rank {rank}: loss did not decrease: {result['losses']} -> {result['final']}"
        )
        assert result["params"].keys() == first.keys()
        for name, value in result["params"].items():
            assert torch.equal(value, first[name]), f"rank {rank}: parameter {name} differs"
    if len(results) > 1:  # each rank trained on its own data
        assert results[0]["losses"][0] != results[1]["losses"][0]


@pytest.fixture
def gloo_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))


def test_ddp_gloo_two_cpu_processes(tmp_path: Path, gloo_env: None) -> None:
    _check_ddp_results(_run_ddp(tmp_path, world=2, backend="gloo", sync_bn=False))


@pytest.mark.skipif(
    not (torch.cuda.is_available() and dist.is_nccl_available()),
    reason="SyncBatchNorm under DDP needs CUDA + NCCL (DDP refuses SyncBatchNorm on CPU modules); "
    "no CUDA device or no NCCL here",
)
def test_ddp_syncbn_cuda_nccl(tmp_path: Path) -> None:
    # 2 ranks need 2 GPUs (NCCL refuses two ranks on one device); with one GPU the test still
    # runs the SyncBatchNorm + DDP code path on a single rank
    world = min(2, torch.cuda.device_count())
    _check_ddp_results(_run_ddp(tmp_path, world=world, backend="nccl", sync_bn=True))


# ---------------------------------------------------------------------------------------------
# no layer issues a collective by itself


_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
)


class _CollectiveRecorder(TorchDispatchMode):
    """Records every c10d op reaching the dispatcher (also direct ``ProcessGroup`` calls and
    functional collectives, which the Python-level patch below would miss)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@contextmanager
def _no_collectives(monkeypatch: pytest.MonkeyPatch) -> Iterator[_CollectiveRecorder]:
    def refuse(name: str) -> Callable[..., None]:
        def call(*args: Any, **kwargs: Any) -> None:
            raise AssertionError(f"torch.distributed.{name} called inside a layer's forward")

        return call

    with monkeypatch.context() as patch:
        for name in _COLLECTIVES:
            for owner in (dist, dist.distributed_c10d):
                if hasattr(owner, name):
                    patch.setattr(owner, name, refuse(name))
        with _CollectiveRecorder() as recorder:
            yield recorder


@pytest.fixture(scope="module")
def single_process_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    init = tmp_path_factory.mktemp("pg") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_collective_detector_works(
    single_process_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = torch.ones(3)
    with _no_collectives(monkeypatch), pytest.raises(AssertionError, match="all_reduce"):
        dist.all_reduce(t)
    with _no_collectives(monkeypatch) as recorder:
        dist.distributed_c10d._get_default_group().allreduce([t]).wait()
    assert recorder.calls == ["c10d.allreduce_.default"]


def test_ema_sync_is_an_explicit_call(
    single_process_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMA's cross-rank average of its bases is the one collective in the zoo: it happens only
    when the user calls ``sync_bases()``, never inside forward."""
    if "ema" not in gald.list_ga():
        pytest.skip("no 'ema' layer registered")
    ema = gald.create_ga("ema", 16).train()
    x = torch.randn(2, 16, 9, 11)
    with _no_collectives(monkeypatch) as recorder:
        ema(x)
    assert recorder.calls == []
    with _no_collectives(monkeypatch), pytest.raises(AssertionError, match="all_reduce"):
        ema.sync_bases()
    before = ema.bases.clone()
    ema.sync_bases()  # one rank: the average is the bases themselves
    torch.testing.assert_close(ema.bases, before)


@pytest.mark.parametrize("ga", gald.list_ga())
def test_forward_issues_no_collective(
    ga: str, single_process_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every GA inside GALD (the block contains the GA and the LD) and the heads."""
    assert dist.is_initialized()
    torch.manual_seed(0)
    module = nn.ModuleDict({"block": gald.GALD(16, ga), "aux": gald.AuxHead(16, 3, channels=8)})
    x = torch.randn(2, 16, 13, 15).requires_grad_(True)
    with _no_collectives(monkeypatch) as recorder:
        module.train()
        (module["block"](x).square().mean() + module["aux"](x).mean()).backward()
        module.eval()
        with torch.no_grad():
            module["block"](x)
    assert recorder.calls == [], f"GALD({ga}) issued collectives: {recorder.calls}"
    assert x.grad is not None


def test_ddp_refuses_syncbn_on_cpu(single_process_group: None) -> None:
    """Why SyncBatchNorm is tested separately: DDP rejects it on CPU modules, and in train mode
    with an initialised process group SyncBatchNorm itself rejects CPU tensors."""
    head = nn.SyncBatchNorm.convert_sync_batchnorm(gald.GALDHead(16, CLASSES, channels=16))
    with pytest.raises(ValueError, match="SyncBatchNorm layers only work with GPU modules"):
        DDP(head)
    with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
        head.train()(torch.randn(2, 16, 9, 9))


def test_wrap_refuses_a_model_already_in_ddp(single_process_group: None) -> None:
    """DDP registers its parameters when it is built: a block wrapped in afterwards would train
    its new parameters unsynchronised. The model itself or a module on the path counts."""
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 3, padding=1))
    ddp = DDP(model)
    with pytest.raises(ValueError, match=r"the model is a DistributedDataParallel.*Wrap the plain"):
        gald.wrap(ddp, "module.1")
    outer = nn.Sequential(DDP(nn.Sequential(nn.Conv2d(16, 16, 1))), nn.Conv2d(16, 16, 1))
    with pytest.raises(ValueError, match=r"'0' is a DistributedDataParallel"):
        gald.wrap(outer, "0.module.0")
    gald.wrap(outer, "1")  # beside the DDP part, not inside it
    assert isinstance(outer[1], gald.GALD)
    plain = gald.wrap(nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 1)), "1")
    assert isinstance(DDP(plain).module[1], gald.GALD)  # wrapped first, then DDP
