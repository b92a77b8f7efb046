"""The planner's Dion bytes against the optimizer's own ledger (launched by test_plan.py).

usage: python plan_worker.py fake OUT_FILE
       python plan_worker.py gloo RANK WORLD STORE_FILE OUT_FILE

"fake": one process plays every rank of every layout of dist_worker.py (and DP x FSDP x TP on
8 ranks) over torch's fake process group, whose collectives send nothing: the optimizer issues
and records its collectives as in a real run, so its ledger is the real one, at a fraction of the
cost of launching the processes. "gloo": a real 2-process run (DDP compressed, FSDP2, TP), one
step of the real model. Each line of the output compares a predicted and a measured ledger.
"""

from __future__ import annotations

import functools
import json
import sys

import dist_worker as dw
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

from torchdion.parallel import fsdp_beside_tp
from torchdion.plan import DionConfig, Parallelism, dion_collectives, ledger, params_from_module


def tp_dims() -> dict[str, int]:
    return {f"{name}.weight": 0 if isinstance(style, ColwiseParallel) else 1
            for name, style in dw.tp_plan().items()}


def parallelism(name: str, world: int) -> Parallelism:
    sizes = {"ddp": dict(dp=world), "ddp_full": dict(dp=world), "fsdp": dict(fsdp=world),
             "tp": dict(tp=world), "hsdp": dict(dp=2, fsdp=world // 2),
             "fsdp_tp": dict(fsdp=2, tp=world // 2), "hsdp_tp": dict(dp=2, fsdp=2, tp=world // 4)}
    return Parallelism(**sizes[name.removeprefix("moe_")])


MOE_TP_DIMS = {"w1": 1, "w2": 2}  # the hidden dim of each stack of experts


def moe_layout(name, world, rank):
    """dist_worker.MoE (3 stacked experts beside a 2-D router) laid out as the planner's
    Parallelism of the same name lays it out: FSDP's dim 0 of a stack is its expert dim."""
    layout = name.removeprefix("moe_")
    kw = {}
    if layout == "fsdp":
        mesh, outer = init_device_mesh("cpu", (world,)), []
    elif layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("rep", "shard"))
        outer, kw = [Replicate()], dict(replicate_group=mesh["rep"])
    else:  # fsdp_tp
        mesh, outer = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp")), []
    model = dw.MoE()
    for n, p in list(model.named_parameters()):
        placements = [*outer, Shard(0)]
        if layout == "fsdp_tp":
            placements.append(Shard(MOE_TP_DIMS[n]) if n in MOE_TP_DIMS else Replicate())
        setattr(model, n, nn.Parameter(distribute_tensor(p.detach(), mesh, placements)))
    return model, kw, None


def hsdp_tp(world, rank):
    """Replicas x FSDP x TP (2 x 2 x world/4): HSDP over a tensor-parallel model."""
    mesh = init_device_mesh("cpu", (2, 2, world // 4), mesh_dim_names=("rep", "shard", "tp"))
    model = parallelize_module(dw.make_net(), mesh["tp"], dw.tp_plan())

    for name in ("w1", "w2", "norm", "w3", "w4", "w5", "w6"):
        fully_shard(getattr(model, name), mesh=mesh["rep", "shard"],
                    shard_placement_fn=fsdp_beside_tp)
    fully_shard(model, mesh=mesh["rep", "shard"], shard_placement_fn=fsdp_beside_tp)
    return model, dict(replicate_group=mesh["rep"]), slice(0, dw.GLOBAL_BATCH)


def finite_weights(model) -> None:
    """Fake collectives leave what they should fill (TP's scatter of the weights) uninitialized;
    a NaN there would fail the optimizer's replica check."""
    with torch.no_grad():
        for p in model.parameters():
            (p.to_local() if isinstance(p, DTensor) else p).zero_()


def random_grads(model) -> None:
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        g = torch.randn(local.shape, dtype=local.dtype)
        p.grad = (DTensor.from_local(g, p.device_mesh, p.placements, shape=p.shape,
                                     stride=p.stride()) if isinstance(p, DTensor) else g)


def compare(name, world, rank, rank_fraction, method, model, opt, algorithm="dion") -> dict:
    measured = opt.comm_stats()
    del measured["largest"], measured["largest_matrix_fraction"]
    if name.startswith("moe_"):
        params = params_from_module(dw.MoE(), stacked=["w1", "w2"], tp_dims=MOE_TP_DIMS)
    else:
        params = params_from_module(dw.make_net(), tp_dims=tp_dims())
    cfg = DionConfig(rank_fraction, method=method, algorithm=algorithm)
    predicted = ledger(dion_collectives(params, parallelism(name, world), cfg, rank,
                                        sync_replicas=name != "ddp_full"))
    formula = dw.expected_elements(model, opt, rank_fraction, method, world)
    return dict(name=name, world=world, rank=rank, rank_fraction=rank_fraction, method=method,
                algorithm=algorithm, predicted=predicted, measured=measured, formula=formula)


# (world, layouts, rank fraction, method[, algorithm]). Cholesky runs only where no rank holds a
# block with fewer columns than r: with collectives that send nothing, such a rank's P stays
# rank-deficient, Cholesky QR fails and falls back to the randomized method, making requests a
# real run would not.
SCENARIOS = [
    (2, ("ddp", "ddp_full", "fsdp", "tp"), 1.0, "randomized"),
    (2, ("ddp", "ddp_full", "fsdp", "tp"), 0.25, "randomized"),
    (2, ("ddp", "ddp_full"), 0.25, "qr"),  # qr is refused where rows are sharded
    (2, ("ddp", "tp"), 0.5, "cholesky"),
    (4, ("ddp", "fsdp", "hsdp", "fsdp_tp"), 0.5, "randomized"),
    (4, ("ddp", "fsdp", "hsdp", "fsdp_tp"), 0.25, "randomized"),
    (4, ("ddp",), 0.25, "qr"),
    (8, ("hsdp_tp",), 0.25, "randomized"),
    # stacked experts (3, so the splits are uneven) under expert parallelism over FSDP's ranks
    (2, ("moe_fsdp",), 0.5, "randomized"),
    (4, ("moe_fsdp", "moe_hsdp", "moe_fsdp_tp"), 0.5, "randomized"),
    (2, ("ddp", "ddp_full", "fsdp", "tp"), 0.25, "randomized", "dion2"),
    (4, ("ddp", "fsdp", "hsdp", "fsdp_tp"), 0.25, "randomized", "dion2"),
    (4, ("fsdp", "fsdp_tp"), 1.0, "randomized", "muon"),
    (8, ("hsdp_tp",), 0.0625, "randomized", "dion2"),
]


def fake(out: str) -> None:
    torch.set_default_dtype(torch.float64)
    builds = {**dw.LAYOUTS[2], **dw.LAYOUTS[4], "hsdp_tp": hsdp_tp,
              **{f"moe_{n}": functools.partial(moe_layout, f"moe_{n}")
                 for n in ("fsdp", "hsdp", "fsdp_tp")}}
    results = []
    for world in sorted({w for w, *_ in SCENARIOS}):
        for rank in range(world):
            dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
            for name, rank_fraction, method, algorithm in [
                    (n, f, m, alg[0] if alg else "dion") for w, names, f, m, *alg in SCENARIOS
                    if w == world for n in names]:
                model, kw, _ = builds[name](world, rank)
                finite_weights(model)
                opt = (dw.moe_opt(model, **kw) if name.startswith("moe_")  # rank 1/2
                       else dw.make_opt(model, rank_fraction, method, algorithm, **kw))
                random_grads(model)
                opt.step()
                results.append(compare(name, world, rank, rank_fraction, method, model, opt,
                                       algorithm))
            dist.destroy_process_group()
            # DTensor caches sharding decisions by mesh shape, which outlive the process group
            DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
            torch._C._clear_DTensor_sharding_propagator_cache()
    with open(out, "w") as f:
        json.dump(results, f)


def gloo(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = []
    for name in ("ddp", "fsdp", "tp"):
        model, kw, rows = dw.LAYOUTS[world][name](world, rank)
        opt = dw.make_opt(model, 0.25, "randomized", **kw)
        x, y = next(dw.batches())
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()
        results.append(compare(name, world, rank, 0.25, "randomized", model, opt))
    with open(out, "w") as f:
        json.dump(results, f)
    dist.barrier()
    dw.exit_without_teardown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "fake":
        from torch.testing._internal.distributed.fake_pg import FakeStore

        fake(sys.argv[2])
    else:
        gloo(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
