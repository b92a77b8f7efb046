"""One rank of the distributed equivalence checks (launched by test_distributed.py).

Every rank also runs the single-process optimizer on the global batch itself, so each scenario
compares the distributed run with the one-device run inside the same process. Results go to a
JSON file per rank; the pytest side asserts on them.

usage: python dist_worker.py RANK WORLD STORE_FILE OUT_FILE CHECKPOINT_DIR
"""

from __future__ import annotations

import json
import math
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import torchdion
from torchdion.matrix_plan import dion_rank
from torchdion.orthonormalize import sketch_rows
from torchdion.parallel import fsdp_beside_tp

STEPS = 10
GLOBAL_BATCH = 256  # larger than every matrix dim: momentum of full rank (docs/design.md section 7)


class Net(nn.Module):
    """Tall, wide and square matrices whose dims do not divide by 4; w6 has 3 rows, so 4-way
    sharding of its rows leaves one rank an empty shard."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(30, 70, bias=False)   # 70 x 30, tall
        self.w2 = nn.Linear(70, 64, bias=False)   # 64 x 70, wide
        self.norm = nn.LayerNorm(64)              # element-wise parameters
        self.w3 = nn.Linear(64, 64, bias=False)   # square
        self.w4 = nn.Linear(64, 70, bias=False)   # 70 x 64, tall
        self.w5 = nn.Linear(70, 30, bias=False)   # 30 x 70, wide
        self.w6 = nn.Linear(30, 3, bias=False)    # 3 x 30, a side head on the input

    def forward(self, x):
        h = torch.tanh(self.w1(x))
        h = self.norm(self.w2(h))
        h = torch.tanh(self.w3(h))
        h = torch.tanh(self.w4(h))
        # w6 sits beside the stack so it does not cap the rank of w5's gradient at 3.
        return torch.cat([self.w5(h), self.w6(x)], dim=-1)


def make_net() -> Net:
    torch.manual_seed(1234)
    return Net()


def batches(start=0, stop=STEPS):
    gen = torch.Generator().manual_seed(99)
    target = torch.randn(30, 33, generator=gen)
    for i in range(stop):
        x = torch.randn(GLOBAL_BATCH, 30, generator=gen)
        if i >= start:
            yield x, torch.tanh(x @ target)


# "dion-options": Dion with its quality options all on, each of which must stay exact everywhere
OPTIONS = dict(nesterov=True, polar_q=True, direction_tol=0.05, lr_scale="muon")
# "dion-bf16": Dion's four big products in bf16 (matmul_dtype); close to one device, not exact
BF16 = dict(matmul_dtype=torch.bfloat16)


def make_opt(model, rank_fraction, method, algorithm="dion", **kw):
    """Hidden matrices in a group of ``algorithm`` ("dion" with its defaults, Nesterov among
    them; "dion2"; "muon" with Nesterov; "dion-options": Dion with OPTIONS)."""
    matrices = dict(rank_fraction=rank_fraction, algorithm=algorithm,
                    nesterov=True if algorithm == "muon" else None)
    if algorithm == "dion-options":
        matrices.update(OPTIONS, algorithm="dion")
    if algorithm == "dion-bf16":
        matrices.update(BF16, algorithm="dion")
    groups = torchdion.param_groups(model, dion=matrices)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        g["param_names"] = [names[id(p)] for p in g["params"]]
    return torchdion.Dion(groups, lr=0.05, orthonormalize=method, weight_decay=0.01, **kw)


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def reference(rank_fraction, method, algorithm="dion"):
    model = make_net()
    opt = make_opt(model, rank_fraction, method, algorithm)
    for x, y in batches():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    momenta = {n: opt.state[p]["momentum"].clone() for n, p in model.named_parameters()
               if "momentum" in opt.state[p]}
    return params, momenta


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def update_err(params, ref_params) -> float:
    """The largest difference of the weight change over the run, X_T - X_0, relative to the
    reference's change, over the Dion matrices (2-D parameters)."""
    start = dict(make_net().named_parameters())
    return max(rel_err(params[n] - start[n].detach(), ref_params[n] - start[n].detach())
               for n in params if params[n].ndim == 2)


# ------------------------------------------------------------------ layouts
# Each returns (model, optimizer kwargs, batch slice for this rank).

def ddp(world, rank):
    model = make_net()
    share = GLOBAL_BATCH // world
    return model, dict(replicate_group=dist.group.WORLD), slice(rank * share, (rank + 1) * share)


def ddp_full(world, rank):
    """DDP averages full gradients; the optimizer is told they arrive synchronized."""
    model, _, rows = ddp(world, rank)
    wrapped = nn.parallel.DistributedDataParallel(model)
    return wrapped, dict(replicate_group=dist.group.WORLD, gradients_synchronized=True), rows


def fsdp(world, rank):
    mesh = init_device_mesh("cpu", (world,))
    model = make_net()
    for name in ("w1", "w2", "norm", "w3", "w4", "w5", "w6"):
        fully_shard(getattr(model, name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    share = GLOBAL_BATCH // world
    return model, {}, slice(rank * share, (rank + 1) * share)


def tp_plan():
    return {
        "w1": ColwiseParallel(),
        "w2": RowwiseParallel(),
        "w3": ColwiseParallel(),
        "w4": RowwiseParallel(),
        "w5": ColwiseParallel(output_layouts=Replicate()),
    }


def tp(world, rank):
    mesh = init_device_mesh("cpu", (world,))
    model = parallelize_module(make_net(), mesh, tp_plan())
    return model, {}, slice(0, GLOBAL_BATCH)


def hsdp(world, rank):
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("rep", "shard"))
    model = make_net()
    for name in ("w1", "w2", "norm", "w3", "w4", "w5", "w6"):
        fully_shard(getattr(model, name), mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    share = GLOBAL_BATCH // world
    return model, dict(replicate_group=mesh["rep"]), slice(rank * share, (rank + 1) * share)


def fsdp_tp(world, rank):
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    model = parallelize_module(make_net(), mesh["tp"], tp_plan())

    for name in ("w1", "w2", "norm", "w3", "w4", "w5", "w6"):
        fully_shard(getattr(model, name), mesh=mesh["dp"], shard_placement_fn=fsdp_beside_tp)
    fully_shard(model, mesh=mesh["dp"], shard_placement_fn=fsdp_beside_tp)
    dp_rank = mesh["dp"].get_local_rank()
    share = GLOBAL_BATCH // 2
    return model, {}, slice(dp_rank * share, (dp_rank + 1) * share)


LAYOUTS = {
    2: {"ddp": ddp, "ddp_full": ddp_full, "fsdp": fsdp, "tp": tp},
    4: {"ddp": ddp, "fsdp": fsdp, "hsdp": hsdp, "fsdp_tp": fsdp_tp},
}


def expected_elements(model, opt, rank_fraction, method, world) -> dict[str, int]:
    """Elements this rank should send per step, by kind, from the docs/design.md tables (Dion's
    and Dion2's).

    Written from the tables, independently of the library's plan and comm on purpose."""
    out: dict[str, int] = {}

    def add(kind, n):
        out[kind] = out.get(kind, 0) + n

    for group in opt.param_groups:
        for p in group["params"]:
            local = p.to_local() if isinstance(p, DTensor) else p
            syncs = opt.replicate_group is not None and not opt.gradients_synchronized
            if group["algorithm"] in ("adamw", "lion"):
                if syncs:
                    add("grad", local.numel())
                continue
            lay = opt.plan(p, group)
            r = dion_rank(lay.b, rank_fraction, 1)
            # a stacked parameter sends its local matrices' factors side by side
            count = math.prod(lay.local_batch)
            a_loc, b_loc = (lay.rows[1] - lay.rows[0]) * count, lay.cols[1] - lay.cols[0]
            size = {ax: (1 if g is None else dist.get_world_size(g))
                    for ax, g in lay.groups.items()}
            row, col, rep = size.get("row", 1), size.get("col", 1), size.get("replica", 1)
            if group["algorithm"] != "dion":  # Dion2 / Muon: k selected columns
                k = lay.b if group["algorithm"] == "muon" else r
                if syncs:
                    add("grad", local.numel())
                if group["algorithm"] == "dion2" and (row > 1 or col > 1):  # L1 column norms
                    add("norms", lay.b * ((row > 1) + (col > 1)))
                if row > 1:  # ||N||_F^2
                    add("norms", 1)
                if col > 1:
                    add("select", a_loc * k)
                if row > 1:
                    add("gram", group["ns_steps"] * k * k)
                continue
            if syncs and (lay.a + lay.b) * r >= lay.a * lay.b:
                add("grad", local.numel())
            if col > 1:
                add("P", a_loc * r)
            if rep > 1:
                add("P", a_loc * r)
            if row > 1:
                if method == "randomized":
                    add("sketch", sketch_rows(r, lay.a) * r * count)
                add("gram", r * r * count)
                # nesterov: the lookahead's R and B's own R^T P share the row sum
                add("R", b_loc * r * count * (2 if group["nesterov"] else 1))
            if rep > 1:
                add("R", b_loc * r * count)
            if col > 1:
                if group["polar_q"]:  # R's Gram (its diagonal holds the column norms)
                    add("gram", r * r * count)
                else:
                    add("norms", r * count)
    return out


def run_scenario(name, build, world, rank, rank_fraction, method, ref, algorithm="dion",
                 exact=None):
    """``exact``: a second one-device reference (bf16 products: the fp64 one) the weight change
    is also compared with."""
    model, kw, rows = build(world, rank)
    opt = make_opt(model, rank_fraction, method, algorithm, **kw)
    per_step = []
    for x, y in batches():
        opt.zero_grad()
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()
        per_step.append(opt.comm_stats())
    ref_params, ref_momenta = ref
    errs, mom_errs, local_params, full_params = {}, {}, {}, {}
    replica = None if kw.get("gradients_synchronized") else kw.get("replicate_group")
    replica = replica.get_group() if hasattr(replica, "get_group") else replica
    for n, p in model.named_parameters():
        n = n.removeprefix("module.")
        full_params[n] = full(p.detach())
        errs[n] = rel_err(full_params[n], ref_params[n])
        local_params[n] = (p.to_local() if isinstance(p, DTensor) else p).detach()
        if n in ref_momenta:
            mom = opt.state[p]["momentum"]
            mom = full(mom).clone()
            if replica is not None:
                dist.all_reduce(mom, group=replica)
                mom /= dist.get_world_size(replica)
            mom_errs[n] = rel_err(mom, ref_momenta[n])
    # replicas are bitwise identical when the min and max over the group agree everywhere
    identical = True
    if replica is not None:
        for t in local_params.values():
            lo, hi = t.clone(), t.clone()
            dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=replica)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=replica)
            identical &= bool(torch.equal(lo, hi))
    averaged_identical = None
    if replica is not None:
        # Checkpoint consistency: after averaging, every replica holds the same momentum.
        opt.average_replica_state()
        averaged_identical = True
        for p in model.parameters():
            if "momentum" in opt.state[p]:
                t = (opt.state[p]["momentum"].to_local() if isinstance(p, DTensor)
                     else opt.state[p]["momentum"])
                lo, hi = t.clone(), t.clone()
                dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=replica)
                dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=replica)
                averaged_identical &= bool(torch.equal(lo, hi))
    expected = expected_elements(model, opt, rank_fraction, method, world)
    measured = {k: v["elements"] for k, v in per_step[-1]["by_kind"].items()}
    return dict(
        name=name, world=world, rank=rank, rank_fraction=rank_fraction, method=method,
        algorithm=algorithm, param_err=max(errs.values()), momentum_err=max(mom_errs.values()),
        replicas_identical=identical, averaged_identical=averaged_identical,
        expected_elements=expected, measured_elements=measured,
        largest_fraction=max(s["largest_matrix_fraction"] for s in per_step),
        bytes=per_step[-1]["bytes"], collectives=per_step[-1]["collectives"],
        nonfinite_skips=opt.nonfinite_skips, update_err=update_err(full_params, ref_params),
        update_err_exact=None if exact is None else update_err(full_params, exact[0]),
    )


class TwoNets(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = make_net(), make_net()

    def forward(self, x):
        return self.a(x) + self.b(x)


def collectives_per_step(model) -> int:
    opt = make_opt(model, 0.25, "randomized", replicate_group=dist.group.WORLD)
    x, y = next(batches())
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    return opt.comm_stats()["collectives"]


def expect_error(fn) -> str:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return ""


def extra_checks(world, rank) -> dict:
    """Checks that need processes but not the reference run."""
    out = {"name": "extra", "world": world, "rank": rank}
    # Bucketing: twice the matrices, the same number of collectives.
    out["collectives"] = collectives_per_step(make_net())
    out["collectives_double"] = collectives_per_step(TwoNets())

    # Replicas that start apart are refused.
    model = make_net()
    if rank == 1:
        with torch.no_grad():
            model.w3.weight.add_(1e-3)
    out["replica_error"] = expect_error(
        lambda: make_opt(model, 0.25, "randomized", replicate_group=dist.group.WORLD))

    # A non-finite gradient on one replica only: every replica skips the same parameters.
    model, kw, rows = ddp(world, rank)
    opt = make_opt(model, 0.25, "randomized", **kw)
    train(model, opt, rows, 0, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = next(batches(1, 2))
    opt.zero_grad()
    nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
    if rank == 1:
        model.w3.weight.grad[0, 0] = float("nan")
        model.norm.weight.grad[0] = float("inf")
    opt.step()
    out["nonfinite_skips"] = opt.nonfinite_skips
    out["nonfinite_unchanged"] = [n for n, p in model.named_parameters()
                                  if torch.equal(p.detach(), before[n])]
    out["nonfinite_all_finite"] = all(bool(p.isfinite().all()) for p in model.parameters()) and all(
        bool(t.isfinite().all()) for st in opt.state.values() for t in st.values()
        if isinstance(t, torch.Tensor))
    out["nonfinite_identical"] = True
    for p in model.parameters():
        lo, hi = p.detach().clone(), p.detach().clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        out["nonfinite_identical"] &= bool(torch.equal(lo, hi))

    model, _, _ = fsdp(world, rank)
    out["qr_error"] = expect_error(lambda: make_opt(model, 0.25, "qr"))

    out.update(uneven_gradients(world, rank))
    out.update(structure_mismatches(rank))
    out.update(ledger_is_complete(world, rank))

    if world == 4:
        # FSDP and TP both sharding dim 0 give a _StridedShard: refused, naming the parameter.
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        model = parallelize_module(make_net(), mesh["tp"], tp_plan())
        fully_shard(model, mesh=mesh["dp"])
        out["placement_error"] = expect_error(lambda: make_opt(model, 0.25, "randomized"))
    return out


def uneven_gradients(world, rank) -> dict:
    """Two same-shape matrices; each rank has a gradient for one of them only (even ranks A,
    odd ranks B). A missing gradient counts as zero in the replicas' mean, so the step equals a
    single process given the mean of the present gradients (zeros elsewhere)."""
    def grads(r):
        gen = torch.Generator().manual_seed(100 + r)
        return torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)

    def fresh():
        gen = torch.Generator().manual_seed(7)
        return [nn.Parameter(torch.randn(16, 8, generator=gen)) for _ in range(2)]

    ab = fresh()
    opt = torchdion.Dion(ab, lr=0.1, rank_fraction=0.25, replicate_group=dist.group.WORLD)
    gA, gB = grads(rank)
    ab[rank % 2].grad = (gA, gB)[rank % 2]
    opt.step()
    ref = fresh()
    for i, p in enumerate(ref):
        p.grad = sum(grads(r)[i] for r in range(world) if r % 2 == i) / world
    ref_opt = torchdion.Dion(ref, lr=0.1, rank_fraction=0.25)
    ref_opt.step()
    return {"uneven_err": max(rel_err(p.detach(), q.detach()) for p, q in zip(ab, ref)),
            "uneven_skips": opt.nonfinite_skips}


def structure_mismatches(rank) -> dict:
    """Replicas that differ in structure are refused with a ValueError naming the first
    differing parameter, on every rank, instead of aborting in gloo or drifting."""
    def build(extra=False, rank_fraction=0.25, swap=False):
        model = make_net()
        if extra:
            model.extra = nn.Linear(8, 8, bias=False)
        if swap:  # same parameters, another order
            model.w1, model.w2 = model.w2, model.w1
        return make_opt(model, rank_fraction, "randomized", replicate_group=dist.group.WORLD)

    odd = rank % 2 == 1
    return {"extra_param_error": expect_error(lambda: build(extra=odd)),
            "rank_fraction_error": expect_error(lambda: build(rank_fraction=0.5 if odd else 0.25)),
            "order_error": expect_error(lambda: build(swap=odd))}


def ledger_is_complete(world, rank) -> dict:
    """Every all-reduce the optimizer issues (construction, a step, averaging the state) is in
    its ledger: torch.distributed.all_reduce is wrapped and its calls compared."""
    sent = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return real(tensor, *args, **kwargs)

    out = {}
    model, kw, rows = ddp(world, rank)
    dist.all_reduce = counting
    try:
        opt = make_opt(model, 0.25, "randomized", **kw)
        out["ledger_init"] = [len(sent), sum(sent), opt.comm_stats()["collectives"],
                              opt.comm_stats()["bytes"]]
        sent.clear()
        train(model, opt, rows, 0, 1)
        out["ledger_step"] = [len(sent), sum(sent), opt.comm_stats()["collectives"],
                              opt.comm_stats()["bytes"]]
        sent.clear()
        opt.average_replica_state()
        out["ledger_state"] = [len(sent), sum(sent), opt.comm_stats()["collectives"],
                               opt.comm_stats()["bytes"]]
    finally:
        dist.all_reduce = real
    return out


# ------------------------------------------------------------------ mixture of experts
# Stacked expert weights under expert parallelism. Gradients come from the plain model on the
# rank's share of the batch and are handed to the sharded parameters as the parallel model
# would deliver them (FSDP: averaged and sharded; EP: the rank's experts): what is under test
# is the optimizer on these layouts, not the model's own parallelism.

EXPERTS, D_MODEL, D_HIDDEN = 3, 6, 10  # 3 experts: EP over 2 splits them 2 + 1, over 4 leaves
#                                        one rank without any


class MoE(nn.Module):
    """Top-2 routing over stacked experts w1 (E, hidden, d) (tall) and w2 (E, d, hidden) (wide)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.router = nn.Parameter(torch.randn(EXPERTS, D_MODEL, generator=gen))
        self.w1 = nn.Parameter(torch.randn(EXPERTS, D_HIDDEN, D_MODEL, generator=gen) / 2)
        self.w2 = nn.Parameter(torch.randn(EXPERTS, D_MODEL, D_HIDDEN, generator=gen) / 3)

    def forward(self, x, idle=None):
        logits = x @ self.router.T
        if idle is not None:  # routing that sends expert ``idle`` no token
            logits[:, idle] = -math.inf
        top = logits.topk(2, dim=-1)
        gates = torch.zeros_like(logits).scatter(-1, top.indices, top.values.softmax(-1))
        h = torch.tanh(torch.einsum("bd,ehd->beh", x, self.w1))
        return torch.einsum("be,beh,edh->bd", gates, h, self.w2)


def moe_batches(start=0, stop=STEPS):
    gen = torch.Generator().manual_seed(5)
    target = torch.randn(D_MODEL, D_MODEL, generator=gen)
    for i in range(stop):
        x = torch.randn(GLOBAL_BATCH, D_MODEL, generator=gen)
        if i >= start:
            yield x, torch.tanh(x @ target)


def moe_grads(x, y, idle=None) -> dict[str, torch.Tensor]:
    """Gradients of the plain model at the current weights (in MOE_WEIGHTS) on (x, y)."""
    model = MoE()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(MOE_WEIGHTS[n])
    nn.functional.mse_loss(model(x, idle), y).backward()
    return {n: p.grad for n, p in model.named_parameters()}


MOE_WEIGHTS: dict[str, torch.Tensor] = {}


def moe_opt(model, **kw):
    groups = torchdion.param_groups(model, stacked=["w1", "w2"], dion=dict(rank_fraction=0.5))
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        g["param_names"] = [names[id(p)] for p in g["params"]]
    return torchdion.Dion(groups, lr=0.05, weight_decay=0.01, **kw)


def moe_sharded(mesh, placements) -> MoE:
    """MoE whose parameters are DTensors with ``placements[name]`` on ``mesh``."""
    model = MoE()
    for n, p in list(model.named_parameters()):
        setattr(model, n, nn.Parameter(distribute_tensor(p.detach(), mesh, placements[n])))
    return model


def moe_train(model, opt, rows, start, stop, grads_of=None):
    """Steps start..stop; each rank's gradients are those of its ``rows`` of the global batch."""
    for x, y in moe_batches(start, stop):
        MOE_WEIGHTS.update({n: full(p.detach()) for n, p in model.named_parameters()})
        grads = (grads_of or moe_grads)(x[rows], y[rows])
        for n, p in model.named_parameters():
            g = grads.get(n)
            if g is None:
                p.grad = None
            elif isinstance(p, DTensor):
                p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
            else:
                p.grad = g
        opt.step()


def moe_reference(grads_of=None, steps=STEPS):
    model = MoE()
    opt = moe_opt(model)
    moe_train(model, opt, slice(None), 0, steps, grads_of)
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: opt.state[p]["momentum"].clone() for n, p in model.named_parameters()})


def moe_layouts(world, rank):
    """name -> (mesh, placements, optimizer kwargs, batch rows, replica group or None)."""
    everything = slice(None)
    rep2 = {"router": [Replicate()], "w1": [Shard(0)], "w2": [Shard(0)]}
    if world == 2:
        return {"moe_ep": (init_device_mesh("cpu", (2,)), rep2, {}, everything, None)}
    dp_ep = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    half = GLOBAL_BATCH // 2
    dp_rows = slice(dp_ep["dp"].get_local_rank() * half, (dp_ep["dp"].get_local_rank() + 1) * half)
    dp = dp_ep["dp"].get_group()
    ep_fsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "fsdp"))
    return {
        # one rank holds no expert
        "moe_ep4": (init_device_mesh("cpu", (4,)), rep2, {}, everything, None),
        # EP x data-parallel replicas, synchronized by Dion's compressed factors
        "moe_ep_dp": (dp_ep, {n: [Replicate(), *pl] for n, pl in rep2.items()},
                      dict(replicate_group=dp), dp_rows, dp),
        # EP x FSDP on a matrix dim (the router, 2-D, on its rows)
        "moe_ep_fsdp": (ep_fsdp, {"router": [Replicate(), Shard(0)],
                                  "w1": [Shard(0), Shard(1)], "w2": [Shard(0), Shard(1)]},
                        {}, everything, None),
    }


def moe_scenario(name, mesh, placements, kw, rows, replica, ref) -> dict:
    model = moe_sharded(mesh, placements)
    opt = moe_opt(model, **kw)
    moe_train(model, opt, rows, 0, STEPS)
    ref_params, ref_momenta = ref
    errs, mom_errs, identical = {}, {}, True
    for n, p in model.named_parameters():
        errs[n] = rel_err(full(p.detach()), ref_params[n])
        mom = full(opt.state[p]["momentum"]).clone()
        if replica is not None:
            dist.all_reduce(mom, group=replica)
            mom /= dist.get_world_size(replica)
            local = p.to_local().detach()
            lo, hi = local.clone(), local.clone()
            dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=replica)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=replica)
            identical &= bool(torch.equal(lo, hi))
        mom_errs[n] = rel_err(mom, ref_momenta[n])
    stats = opt.comm_stats()
    return dict(name=name, world=dist.get_world_size(), rank=dist.get_rank(),
                param_err=max(errs.values()), momentum_err=max(mom_errs.values()),
                replicas_identical=identical,
                local_experts=opt.plan(model.w1, opt.param_groups[-1]).local_batch,
                q_shape=list(opt.state[model.w1]["Q"].shape),
                q_placements=[str(pl) for pl in opt.state[model.w1]["Q"].placements],
                expected_elements=expected_elements(model, opt, 0.5, "randomized",
                                                    dist.get_world_size()),
                measured_elements={k: v["elements"] for k, v in stats["by_kind"].items()})


class SplitMoE(nn.Module):
    """MoE with one parameter per expert for w1 (as a module per expert has), w2 stacked."""

    def __init__(self) -> None:
        super().__init__()
        base = MoE()
        self.router, self.w2 = base.router, base.w2
        self.w1 = nn.ParameterList([nn.Parameter(base.w1[e].detach().clone())
                                    for e in range(EXPERTS)])


def moe_idle(world, rank) -> list[dict]:
    """Experts that get no token on some ranks. Zero gradients: expert 1 on rank 1, inside a
    stack. Missing (None) gradients: the separate expert parameter w1.1 on rank 1, and the whole
    stack w2 on rank 0. Compressed replicas over all ranks, on a group with a short timeout so
    that a desynchronized collective fails instead of hanging; each run is compared with one
    process given the replicas' mean gradient, a missing one counting as zero."""
    group = dist.new_group(timeout=timedelta(seconds=60))
    share = GLOBAL_BATCH // world

    def rank_grads(r, x, y, split):  # what rank r computes on its share of the batch
        rows = slice(r * share, (r + 1) * share)
        g = moe_grads(x[rows], y[rows], idle=1 if r == 1 else None)
        if not split:
            return g
        g = {"router": g["router"], "w2": g["w2"],
             **{f"w1.{e}": g["w1"][e] for e in range(EXPERTS)}}
        if r == 1:
            g["w1.1"] = None
        if r == 0:
            g["w2"] = None
        return g

    def mean_grads(split):
        def grads(x, y):
            each = [rank_grads(r, x, y, split) for r in range(world)]
            return {n: sum(g[n] for g in each if g[n] is not None) / world for n in each[0]}
        return grads

    def run(split, grads_of, replicate_group=None):
        model = SplitMoE() if split else MoE()
        groups = torchdion.param_groups(model, stacked=["w1", "w2"], dion=dict(rank_fraction=0.5))
        opt = torchdion.Dion(groups, lr=0.05, weight_decay=0.01, replicate_group=replicate_group)

        def stacking(x, y):  # moe_grads reads a stacked w1
            if split:
                MOE_WEIGHTS["w1"] = torch.stack([MOE_WEIGHTS[f"w1.{e}"] for e in range(EXPERTS)])
            return grads_of(x, y)
        moe_train(model, opt, slice(None), 0, STEPS, stacking)
        return model

    out = []
    for name, split in (("moe_idle_zero", False), ("moe_idle_none", True)):
        ref = {n: p.detach() for n, p in run(split, mean_grads(split)).named_parameters()}
        try:
            model = run(split, lambda x, y, s=split: rank_grads(rank, x, y, s), group)
            result = moe_idle_result(name, model, ref, group)
        except Exception as err:  # reported, not raised: the other ranks must not hang on this one
            result = dict(name=name, world=world, rank=rank, error=repr(err)[:500])
        out.append(result)
    return out


def moe_idle_result(name, model, ref, group) -> dict:
    errs, identical = {}, True
    for n, p in model.named_parameters():
        errs[n] = rel_err(p.detach(), ref[n])
        lo, hi = p.detach().clone(), p.detach().clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
        identical &= bool(torch.equal(lo, hi))
    return dict(name=name, world=dist.get_world_size(), rank=dist.get_rank(),
                param_err=max(errs.values()), replicas_identical=identical, error="")


def moe_checks(world, rank, ckpt) -> list[dict]:
    ref = moe_reference()
    out = [moe_scenario(name, *layout, ref)
           for name, layout in moe_layouts(world, rank).items()]
    out += moe_idle(world, rank)
    path = ckpt + "_moe"
    if world == 4:  # saved under EP x FSDP ...
        mesh, placements, kw, rows, _ = moe_layouts(world, rank)["moe_ep_fsdp"]
        model = moe_sharded(mesh, placements)
        opt = moe_opt(model, **kw)
        moe_train(model, opt, rows, 0, CUT)
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    else:  # ... resumed under EP over 2 (the pytest process resumes it on one)
        mesh, placements, kw, rows, _ = moe_layouts(world, rank)["moe_ep"]
        model = moe_sharded(mesh, placements)
        opt = moe_opt(model, **kw)
        moe_resume(model, opt, path)
        moe_train(model, opt, rows, CUT, STEPS)
        err = max(rel_err(full(p.detach()), ref[0][n]) for n, p in model.named_parameters())
        out.append(dict(name="resume_moe_ep", world=world, rank=rank, param_err=err))
    return out


def moe_resume(model, opt, path):
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def compile_where_sharded(world, rank) -> dict:
    """Dion(compile=True) under FSDP, where every Dion matrix's sums cross processes: nothing is
    compiled and the steps are bitwise the eager ones (compile applies to batches without
    collectives only)."""
    from torch._dynamo.utils import counters

    counters.clear()
    weights = []
    for compile in (False, True):
        model, kw, rows = fsdp(world, rank)
        opt = make_opt(model, 0.25, "randomized", compile=compile, **kw)
        train(model, opt, rows, 0, 2)
        weights.append({n: full(p.detach()) for n, p in model.named_parameters()})
    return {"name": "compile_sharded", "world": world, "rank": rank,
            "identical": all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0]),
            "graphs": counters["stats"]["unique_graphs"]}


CUT = STEPS // 2  # checkpoints are taken after this many steps


def train(model, opt, rows, start, stop):
    for x, y in batches(start, stop):
        opt.zero_grad()
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()


def save_checkpoint(world, rank, path, algorithm="dion"):
    """Compressed DDP for CUT steps, replicas averaged, saved with DCP."""
    model, kw, rows = ddp(world, rank)
    opt = make_opt(model, 0.25, "randomized", algorithm, **kw)
    train(model, opt, rows, 0, CUT)
    opt.average_replica_state()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def resume_checkpoint(name, build, world, rank, path, ref, algorithm="dion"):
    """Load the checkpoint into another layout and world size; finish the run; compare."""
    model, kw, rows = build(world, rank)
    opt = make_opt(model, 0.25, "randomized", algorithm, **kw)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, opt, rows, CUT, STEPS)
    ref_params, _ = ref
    err = max(rel_err(full(p.detach()), ref_params[n.removeprefix("module.")])
              for n, p in model.named_parameters())
    return {"name": f"resume_{name}", "world": world, "rank": rank, "param_err": err,
            "algorithm": algorithm}


def main() -> None:
    rank, world, store, out, ckpt = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                     sys.argv[4], sys.argv[5])
    torch.set_num_threads(1)
    # float64: at full rank the orthonormalized direction is as ill-conditioned as the momentum,
    # so fp32 reassociation alone moves it by ~1e-2; in fp64 any real difference stands out.
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = []
    # Cholesky QR squares P's condition number; at full rank that is the momentum's own and
    # two correct runs part at the 1e-3 level even in fp64, so it is checked at r < b only.
    combos = [("dion", 1.0, "randomized"), ("dion", 0.5, "randomized"),
              ("dion", 0.5, "cholesky"), ("dion", 0.25, "randomized"), ("dion", 0.25, "cholesky"),
              ("dion2", 0.25, "randomized"), ("muon", 1.0, "randomized"),
              ("dion-options", 0.25, "randomized")]
    refs = {}
    for algorithm, rank_fraction, method in combos:
        ref = refs[algorithm, rank_fraction, method] = reference(rank_fraction, method, algorithm)
        for name, build in LAYOUTS[world].items():
            results.append(run_scenario(name, build, world, rank, rank_fraction, method, ref,
                                        algorithm))
    # bf16 products on every layout: against one device with bf16 products and against fp64
    ref = reference(0.25, "randomized", "dion-bf16")
    for name, build in LAYOUTS[world].items():
        results.append(run_scenario(name, build, world, rank, 0.25, "randomized", ref,
                                    "dion-bf16", exact=refs["dion", 0.25, "randomized"]))
    results.append(extra_checks(world, rank))
    results.append(compile_where_sharded(world, rank))
    results += moe_checks(world, rank, ckpt)
    if world == 4:
        save_checkpoint(world, rank, ckpt)
        save_checkpoint(world, rank, ckpt + "_dion2", "dion2")
    else:
        for algorithm, path in (("dion", ckpt), ("dion2", ckpt + "_dion2")):
            ref = reference(0.25, "randomized", algorithm)
            for name, build in LAYOUTS[world].items():
                results.append(resume_checkpoint(name, build, world, rank, path, ref, algorithm))
    with open(out, "w") as f:
        json.dump(results, f)
    dist.barrier()
    exit_without_teardown()


def exit_without_teardown() -> None:
    """Leave without interpreter finalization: in about 1 run in 6, a gloo-backed process group
    still referenced by meshes and models aborted there ("terminate called without an active
    exception", no Python frame) after all work and the results file were complete. It is torch's:
    gloo's worker threads can still hold finished work whose tensors are released during
    finalization (pytorch/pytorch pull request 179291, an atexit fix that was abandoned)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
