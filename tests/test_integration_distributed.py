"""torch.distributed on CPU (gloo, 2 processes): DDP and FSDP2 give single-process norms.

One spawn runs every scenario (starting processes is the slow part); each test checks one
aspect of the results against a plain-torch, single-process reference on the same global batch.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tolerance import norm_rtol
from torch import nn

import gradscope
from gradscope.signals.distributed import is_sharded, local_tensor, sharded_norms

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch without distributed")

WORLD = 2
# FSDP2 (torch.distributed.fsdp.fully_shard) is public from torch 2.6, and runs on CPU (gloo)
# from 2.7: 2.6 calls CUDA-only stream methods on CPU
FSDP2_ON_CPU = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 7)
NO_FSDP2 = "FSDP2 on CPU needs torch 2.7 or newer"
STEPS = 3
MICRO = 2  # micro-batches per optimizer step (the first without gradient sync)
ROWS = 4  # rows per micro-batch per rank


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7), nn.ReLU(),
                         nn.Linear(7, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    n = STEPS * WORLD * MICRO * ROWS
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def _rows(step: int, rank: int, micro: int) -> slice:
    """Rows of one micro-batch: each optimizer step uses one global batch of 16 rows."""
    start = (step * WORLD * MICRO + rank * MICRO + micro) * ROWS
    return slice(start, start + ROWS)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y) / MICRO


def _reference() -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Single process, whole global batch: per-layer gradient and weight norms per step."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    layers = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    grads, weights = [], []
    for step in range(STEPS):
        opt.zero_grad()
        rows = slice(step * WORLD * MICRO * ROWS, (step + 1) * WORLD * MICRO * ROWS)
        (nn.functional.mse_loss(model(x[rows]), y[rows])).backward()
        modules = dict(model.named_modules())
        grads.append(np.array([torch.cat([p.grad.reshape(-1) for p in modules[n].parameters()])
                               .double().norm().item() for n in layers]))
        weights.append(np.array([torch.cat([p.reshape(-1) for p in modules[n].parameters()])
                                 .detach().double().norm().item() for n in layers]))
        opt.step()
    return grads, weights, layers


def _train(model, opt, scope, rank: int, sync_off) -> None:
    x, y = _data()
    for step in range(STEPS):
        opt.zero_grad()
        for micro in range(MICRO):
            rows = _rows(step, rank, micro)
            context = sync_off() if micro < MICRO - 1 else contextlib.nullcontext()
            with context:
                _loss(model, x[rows], y[rows]).backward()
        opt.step()
        scope.step(torch.tensor(0.5))


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank calls it), else itself."""
    return t.full_tensor() if is_sharded(t) else t


def _capture_layer_norms(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, list]:
    """Test-side reference: float64 per-layer norms of the gradients and weights the optimizer
    is about to use, taken in its step pre-hook (where gradscope reads them too)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    seen: dict[str, list] = {"grad": [], "weight": [], "numel": []}

    def hook(optimizer, args, kwargs):
        grads, weights = [], []
        for layer in layers:
            ps = list(layer.parameters())
            grads.append(torch.cat([_full(p.grad).reshape(-1) for p in ps]).double().norm().item())
            weights.append(torch.cat([_full(p.detach()).reshape(-1) for p in ps])
                           .double().norm().item())
        seen["grad"].append(np.array(grads))
        seen["weight"].append(np.array(weights))
        seen["numel"] = [sum(p.numel() for p in layer.parameters()) for layer in layers]

    seen["handle"] = opt.register_step_pre_hook(hook)
    return seen


def _layer_norms(scope, field: str, prefix: str) -> list[np.ndarray]:
    layout = scope.history.layout
    out = []
    for record in scope.history.records():
        per_layer = (record.layer_grad_norm(layout) if field == "grad"
                     else record.layer_param_norm(layout))
        out.append(np.asarray(per_layer))
    assert all(name.startswith(prefix) or prefix == "" for name in layout.layers)
    return out


def _ddp(rank: int, out: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, opt, every=1, log_dir=out / f"log_rank{rank}")
    seen = _capture_layer_norms(model, opt)
    _train(model, opt, scope, rank, model.no_sync)
    scope.close()
    seen.pop("handle").remove()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        scope.report()
    return {"grad": _layer_norms(scope, "grad", "module."),
            "weight": _layer_norms(scope, "param", "module."),
            "backward": [r.backward_count for r in scope.history.records()],
            "printed": printed.getvalue(), "seen": seen,
            "update": [float(np.nanmax(r.update_ratio)) for r in scope.history.records()]}


def _fsdp(rank: int, out: Path) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.watch(model, opt, every=1)
    seen = _capture_layer_norms(model, opt)
    sharded = all(is_sharded(p) for p in model.parameters())

    @contextlib.contextmanager
    def sync_off():
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    _train(model, opt, scope, rank, sync_off)
    scope.close()
    seen.pop("handle").remove()
    return {"grad": _layer_norms(scope, "grad", ""), "seen": seen,
            "weight": _layer_norms(scope, "param", ""),
            "sharded": sharded,
            "update": [float(np.nanmax(r.update_ratio)) for r in scope.history.records()],
            "failures": scope.failures}


def _fsdp_loss_nan_on_one_rank(rank: int) -> list[int]:
    """A non-finite loss seen by rank 0 only must not make rank 0 record an extra step: the
    sharded norms are a collective, so both ranks must record the same steps."""
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scope = gradscope.watch(model, opt, every=2)
    x, y = _data()
    for step in range(4):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x[_rows(step, rank, 0)]), y[_rows(step, rank, 0)])
        loss.backward()
        opt.step()
        scope.step(float("nan") if rank == 0 and step == 0 else loss)
    scope.close()
    return [r.step for r in scope.history.records()]


def _dtensor_unit(rank: int) -> dict:
    """A gradient sharded by hand over the two ranks, uneven and with an empty shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(5)
    full = [torch.randn(5, 3, generator=g), torch.randn(1, generator=g) * 7]
    shards = [distribute_tensor(t, mesh, [Shard(0)]) for t in full]
    norms, maxes = sharded_norms(shards)
    return {"norms": norms.tolist(), "maxes": maxes.tolist(),
            "expected": [t.double().norm().item() for t in full],
            "expected_max": [t.abs().max().item() for t in full],
            "local_sizes": [local_tensor(s).numel() for s in shards]}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    # a mismatched collective fails after the timeout instead of hanging the test run
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {"ddp": _ddp(rank, Path(out)), "dtensor": _dtensor_unit(rank)}
        try:
            if not FSDP2_ON_CPU:
                raise ImportError(NO_FSDP2)
            results["fsdp"] = _fsdp(rank, Path(out))
            results["fsdp_nan"] = _fsdp_loss_nan_on_one_rank(rank)
        except ImportError as err:  # torch without FSDP2
            results["fsdp"] = {"error": str(err)}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    # DDP and FSDP import torch._dynamo (seconds per process): import it once here and fork,
    # so the two workers start with it loaded
    import torch._dynamo

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True,
                       start_method=method)
    loaded = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in loaded:
        r["out"] = out
    return loaded


def _largest_relative_difference(measured: list[np.ndarray], reference: list[np.ndarray]):
    return max(float(np.max(np.abs(m - r) / r)) for m, r in zip(measured, reference))


# Gradients of the same global batch, summed per rank and averaged across ranks, differ from
# the single-process ones only by the order of float32 additions (about 1e-7 relative here);
# wrong averaging or a missed micro-batch is off by 2x. 1e-4 tells the two apart.
SAME_TRAINING = 1e-4


def _assert_measured_equals_seen(measured: list[np.ndarray], seen: dict) -> None:
    """gradscope's per-layer norms against the test's float64 norms of the same tensors: the
    float32 norm error bound of the largest layer, per parameter and across shards."""
    rtol = norm_rtol(max(seen["numel"]) + WORLD)
    for field in ("grad", "weight"):
        got = measured[field] if isinstance(measured, dict) else measured
        np.testing.assert_allclose(np.stack(got), np.stack(seen[field]), rtol=rtol,
                                   err_msg=field)


def test_ddp_norms_equal_single_process_on_every_rank(results):
    grads, weights, _ = _reference()
    for rank in results:
        ddp = rank["ddp"]
        assert len(ddp["grad"]) == STEPS
        _assert_measured_equals_seen(ddp, ddp["seen"])
        assert _largest_relative_difference(ddp["grad"], grads) < SAME_TRAINING
        assert _largest_relative_difference(ddp["weight"], weights) < SAME_TRAINING
        assert ddp["backward"] == [MICRO] * STEPS  # no_sync micro-batches count, once each
        assert all(u > 0 for u in ddp["update"])


def test_ddp_only_rank_zero_prints_and_writes_the_log(results):
    out = results[0]["out"]
    assert "gradscope report" in results[0]["ddp"]["printed"]
    assert results[1]["ddp"]["printed"] == ""
    assert (out / "log_rank0" / "gradscope.jsonl").exists()
    assert not (out / "log_rank1").exists()


def test_fsdp2_sharded_norms_equal_single_process(results):
    if not FSDP2_ON_CPU:
        pytest.skip(NO_FSDP2)
    grads, weights, _ = _reference()
    for rank in results:
        fsdp = rank["fsdp"]
        assert "error" not in fsdp, fsdp.get("error")
        assert fsdp["sharded"] and not fsdp["failures"]
        _assert_measured_equals_seen(fsdp, fsdp["seen"])
        assert _largest_relative_difference(fsdp["grad"], grads) < SAME_TRAINING
        assert _largest_relative_difference(fsdp["weight"], weights) < SAME_TRAINING
        assert all(u > 0 for u in fsdp["update"])  # measured on each rank's own shard


def test_dtensor_shards_combine_to_the_full_norm(results):
    for rank in results:
        unit = rank["dtensor"]
        np.testing.assert_allclose(unit["norms"], unit["expected"], rtol=norm_rtol(15 + WORLD))
        assert unit["maxes"] == unit["expected_max"]  # a max does not round
    # 5 rows over 2 ranks: 3 + 2; 1 row: 1 + 0 (an empty shard)
    assert [r["dtensor"]["local_sizes"] for r in results] == [[9, 1], [6, 0]]


def test_fsdp2_ranks_record_the_same_steps_when_one_sees_a_nan_loss(results):
    if not FSDP2_ON_CPU:
        pytest.skip(NO_FSDP2)
    assert [r["fsdp_nan"] for r in results] == [[0, 2], [0, 2]]
