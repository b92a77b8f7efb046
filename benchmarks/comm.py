"""Bytes and collectives per optimizer step for GPT-2 small, measured in real gloo runs on CPU.

The model holds every parameter tensor of GPT-2 small (124,439,808 parameters at 12 layers):
wte (50257, 768) and wpe (1024, 768) embeddings, the output head tied to wte, per layer ln_1 and
ln_2 (weight + bias, 768 each), c_attn (2304, 768), attn c_proj (768, 768), c_fc (3072, 768),
mlp c_proj (768, 3072) as nn.Linear (out, in) with their biases, and ln_f. Dion trains the four
matrices of each layer; wte, wpe, norms and biases use element-wise AdamW. Bytes depend on shapes
only, so the forward pass is synthetic: each parameter gets a fixed random gradient (different on
every rank, full rank) through an autograd function, without attention or activations.

Arms, each stepped in W processes over gloo with a file store:

- DDP + AdamW: DDP's gradient all-reduce, counted by a comm hook that all-reduces each bucket
  through torch.distributed.all_reduce.
- DDP + PowerSGD (torch's powerSGD_hook) at rank 768 / 4 = 192, the rank Dion uses at 1/4;
  measured on steps after compression starts (start_powerSGD_iter = 2, its minimum).
- Dion compressed (replicate_group = WORLD, no DDP) at rank fractions 1/4 and 1/16.
- Dion under FSDP2 (fully_shard per block and at the root, 1-D mesh), rank fraction 1/4: the
  optimizer's own collectives; FSDP's parameter all-gathers and gradient reduce-scatters are
  measured separately, being the same for any optimizer.
- Muon with Newton-Schulz under FSDP: every rank all-gathers every full matrix (computed).
- Dion2 at fraction 1/4 (algorithm="dion2"): under replicate_group (whose replicas average the
  whole gradient: Dion2 has no factors to send instead) and under FSDP2 (the column norms, the
  selected columns, and one Gram per Newton-Schulz step). torchdion's Muon under FSDP2 is the
  planner's prediction only (its Newton-Schulz on 768-wide blocks takes minutes per step here).

Every torch.distributed collective issued in a measured step is counted by wrapping the
torch.distributed functions; for Dion the optimizer's ledger (opt.comm_stats()) must agree with
that count and with torchdion.plan's prediction (the optimizer's own update run on shapes), or
the benchmark exits non-zero.

Conventions. "Payload" is what the optimizer's ledger records: the bytes handed to each
collective (an all-reduce's tensor; an all-gather's or reduce-scatter's input). "Ring bytes" is
what one rank sends on the wire with ring algorithms: 2 (W - 1) / W x payload for all-reduce,
(W - 1) x payload for all-gather (payload = the shard), (W - 1) / W x payload for
reduce-scatter. Ratios compare ring bytes, which for all-reduce-only arms equals the payload ratio.

    python benchmarks/comm.py                       # 12 layers, world sizes 2 and 4
    python benchmarks/comm.py --quick               # 2 layers, world 2 (CI smoke test)
    python benchmarks/comm.py --markdown benchmarks/results/comm.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torchdion.matrix_plan import chunk, dion_rank
from torchdion.plan import (
    DionConfig,
    Parallelism,
    dion_collectives,
    ledger,
    params_from_module,
    powersgd_elements,
)

HIDDEN = 768
VOCAB = 50257
CONTEXT = 1024
# (out, in) of the four matrices of one block: c_attn, attn c_proj, c_fc, mlp c_proj.
BLOCK_SHAPES = ((3 * HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (4 * HIDDEN, HIDDEN), (HIDDEN, 4 * HIDDEN))
DION_FRACTIONS = (1 / 4, 1 / 16)
FSDP_FRACTION = 1 / 4
DION2_FRACTION = 1 / 4
POWERSGD_START = 2  # the smallest start_powerSGD_iter torch allows with error feedback
MB = 1e6


# ------------------------------------------------------------------------------ the model

class _SyntheticGrad(torch.autograd.Function):
    """Returns 0 and gives its input a seeded random gradient, generated in backward so that no
    gradient-sized tensor is held between forward and backward."""

    @staticmethod
    def forward(ctx, weight: Tensor, seed: int) -> Tensor:
        ctx.shape, ctx.dtype, ctx.seed = weight.shape, weight.dtype, seed
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        if tuple(ctx.shape) not in BLOCK_SHAPES:
            # element-wise parameters only need some gradient; filling is cheaper than randn
            # on the 38.6M-element embedding
            return torch.full(ctx.shape, 1e-3 * (1 + ctx.seed % 97), dtype=ctx.dtype), None
        # Dion matrices get full-rank noise, as real gradients over a large batch have
        gen = torch.Generator().manual_seed(ctx.seed)
        return torch.randn(ctx.shape, generator=gen, dtype=ctx.dtype).mul_(1e-3), None


def _grad_terms(params, seed: int) -> Tensor:
    return sum(_SyntheticGrad.apply(p, seed + i) for i, p in enumerate(params))


class Block(nn.Module):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.ln_1 = nn.LayerNorm(HIDDEN)
        self.c_attn = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.attn_proj = nn.Linear(HIDDEN, HIDDEN)
        self.ln_2 = nn.LayerNorm(HIDDEN)
        self.c_fc = nn.Linear(HIDDEN, 4 * HIDDEN)
        self.mlp_proj = nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, h: Tensor, seed: Tensor) -> Tensor:
        # Parameters are read inside forward so that FSDP2 hands out its unsharded copies.
        return h + _grad_terms(self.parameters(), int(seed) + 100 * (self.index + 1))


class GPT2Shapes(nn.Module):
    """GPT-2 small's parameter tensors with a synthetic loss (see the module docstring)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, HIDDEN)
        self.wpe = nn.Embedding(CONTEXT, HIDDEN)
        self.blocks = nn.ModuleList(Block(i) for i in range(layers))
        self.ln_f = nn.LayerNorm(HIDDEN)

    def forward(self, seed: Tensor) -> Tensor:
        h = _grad_terms([self.wte.weight, self.wpe.weight, self.ln_f.weight, self.ln_f.bias],
                        int(seed))
        for block in self.blocks:
            h = block(h, seed)
        return h


def make_model(layers: int) -> GPT2Shapes:
    with torch.device("meta"):
        model = GPT2Shapes(layers)
    model.to_empty(device="cpu")
    # Identical on every rank, as replicas must start: Dion checks this.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model


def step_seed(rank: int, step: int) -> Tensor:
    return torch.tensor(1_000_000 * (rank + 1) + 10_000 * step)


def is_hidden(p: Tensor) -> bool:
    return p.ndim == 2 and tuple(p.shape) in BLOCK_SHAPES


# ------------------------------------------------------------------------------ counting

def _ring_factor(op: str, world: int) -> float:
    if op == "all_reduce":
        return 2 * (world - 1) / world
    if op in ("all_gather_single", "all_gather_into_tensor"):
        return world - 1
    return (world - 1) / world  # reduce-scatter, broadcast (per rank, on average)


class CollectiveCounter:
    """Wraps torch.distributed's collectives and records those issued while a phase is set."""

    PAYLOAD_ARG = {
        "all_reduce": "tensor",
        "all_gather_single": "input_tensor",
        "all_gather_into_tensor": "input_tensor",
        "reduce_scatter_single": "input",
        "reduce_scatter_tensor": "input",
        "broadcast": "tensor",
    }

    def __init__(self) -> None:
        self.phase: str | None = None
        self.records: list[dict[str, Any]] = []
        self.classify = lambda tensor: "all"
        for name, arg in self.PAYLOAD_ARG.items():
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._wrap(name, original, arg))

    def _wrap(self, name, original, arg):
        signature = inspect.signature(original)

        def counted(*args, **kwargs):
            if self.phase is not None:
                bound = signature.bind(*args, **kwargs)
                tensor = bound.arguments[arg]
                group = bound.arguments.get("group")
                self.records.append(dict(
                    phase=self.phase, op=name, kind=self.classify(tensor),
                    elements=tensor.numel(), bytes=tensor.numel() * tensor.element_size(),
                    world=dist.get_world_size(group)))
            return original(*args, **kwargs)

        return counted

    def take(self, phase: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["phase"] == phase]

    def reset(self) -> None:
        self.records = []


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    by_kind: dict[str, dict[str, int]] = {}
    for r in records:
        key = f"{r['op']}:{r['kind']}"
        entry = by_kind.setdefault(key, {"bytes": 0, "collectives": 0, "elements": 0})
        entry["bytes"] += r["bytes"]
        entry["collectives"] += 1
        entry["elements"] += r["elements"]
    return dict(
        bytes=sum(r["bytes"] for r in records),
        collectives=len(records),
        ring_bytes=sum(r["bytes"] * _ring_factor(r["op"], r["world"]) for r in records),
        by_kind=by_kind,
    )


# ------------------------------------------------------------------------------ formulas

def dion_prediction(model: nn.Module, fraction: float, par: Parallelism,
                    rank: int, algorithm: str = "dion") -> dict[str, int]:
    """Elements one rank's ledger records per step, by kind, as torchdion.plan predicts them:
    the optimizer's own update run on shapes through a recording comm (model unsharded)."""
    cfg = DionConfig(fraction, algorithm=algorithm)
    predicted = ledger(dion_collectives(params_from_module(model), par, cfg, rank))
    return {kind: v["elements"] for kind, v in predicted["by_kind"].items()}


# ------------------------------------------------------------------------------ arms (worker)

def _free() -> None:
    gc.collect()
    dist.barrier()


def _train_steps(model, opt, counter, rank, steps, *, wrapped=None) -> list[dict[str, Any]]:
    """Steps the model; returns per step the counted collectives of forward+backward and of
    the optimizer step, and the optimizer's ledger when it has one."""
    per_step = []
    fwd = wrapped or model
    for step in range(steps):
        start = time.perf_counter()
        counter.reset()
        counter.phase = "fwd_bwd"
        fwd(step_seed(rank, step)).backward()
        counter.phase = "opt"
        opt.step()
        counter.phase = None
        opt.zero_grad(set_to_none=True)
        per_step.append(dict(
            fwd_bwd=summarize(counter.take("fwd_bwd")), opt=summarize(counter.take("opt")),
            ledger=opt.comm_stats() if hasattr(opt, "comm_stats") else None))
        print(f"  step {step}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return per_step


def _shapes(model: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in model.parameters()]


def arm_ddp_adamw(layers, world, rank, counter):
    model = make_model(layers)
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)

    def hook(_, bucket):
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0].div_(world))

    ddp.register_comm_hook(None, hook)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    # step 0 runs before DDP rebuilds its buckets in gradient order; step 1 is the steady state
    steps = _train_steps(model, opt, counter, rank, 2, wrapped=ddp)
    elements = sum(math.prod(s) for s in _shapes(model))
    hidden = sum(p.numel() for p in model.parameters() if is_hidden(p))
    return dict(steps=steps, measured=steps[-1]["fwd_bwd"],
                formula={"all": elements}, hidden_elements=hidden)


def arm_ddp_powersgd(layers, world, rank, counter, matched_rank, quick,
                     min_compression_rate=2.0):
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

    model = make_model(layers)
    # One bucket. The hook issues its P and Q all-reduces from future callbacks, which gloo runs
    # on its own threads: with several buckets the ranks then issued collectives in different
    # orders and gloo aborted on a size mismatch. PowerSGD's bytes do not depend on bucketing;
    # its collective count is 3 per bucket.
    whole = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20 + 1
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True,
                                              bucket_cap_mb=whole)
    state = powersgd.PowerSGDState(
        process_group=None, matrix_approximation_rank=matched_rank,
        start_powerSGD_iter=POWERSGD_START, min_compression_rate=min_compression_rate)
    ddp.register_comm_hook(state, powersgd.powerSGD_hook)

    def classify(tensor: Tensor) -> str:
        if any(tensor is t for t in state.p_memory_dict.values()):
            return "P"
        if any(tensor is t for t in state.q_memory_dict.values()):
            return "Q"
        return "uncompressed"

    counter.classify = classify
    # The optimizer sends nothing; SGD spares AdamW's two model-sized moments (memory).
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    # Before start_powerSGD_iter the hook all-reduces through the C++ group (uncounted); the
    # full run measures two compressed steps to show that their bytes agree.
    steps = _train_steps(model, opt, counter, rank, POWERSGD_START + (1 if quick else 2),
                         wrapped=ddp)
    counter.classify = lambda tensor: "all"
    measured = steps[POWERSGD_START:]
    assert all(s["fwd_bwd"] == measured[0]["fwd_bwd"] for s in measured), "PowerSGD bytes vary"
    return dict(steps=steps, measured=measured[-1]["fwd_bwd"],
                formula=powersgd_elements(_shapes(model), matched_rank, min_compression_rate))


def _dion(model, fraction, algorithm="dion", **kw):
    import torchdion

    groups = torchdion.param_groups(model, dion=dict(rank_fraction=fraction, algorithm=algorithm))
    return torchdion.Dion(groups, lr=0.01, weight_decay=0.01, **kw)


def arm_dion_ddp(layers, world, rank, counter, fraction, algorithm="dion"):
    model = make_model(layers)
    opt = _dion(model, fraction, algorithm, replicate_group=dist.group.WORLD)
    steps = _train_steps(model, opt, counter, rank, 2)
    return dict(steps=steps, measured=steps[-1]["opt"], ledger=steps[-1]["ledger"],
                formula=dion_prediction(model, fraction, Parallelism(dp=world), rank, algorithm))


def arm_dion_fsdp(layers, world, rank, counter, fraction, algorithm="dion"):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = make_model(layers)
    formula = dion_prediction(model, fraction, Parallelism(fsdp=world), rank, algorithm)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = _dion(model, fraction, algorithm)
    steps = _train_steps(model, opt, counter, rank, 2)
    return dict(steps=steps, measured=steps[-1]["opt"], ledger=steps[-1]["ledger"],
                fsdp_own=steps[-1]["fwd_bwd"],
                formula=formula)


def worker(rank: int, world: int, layers: int, store: str, out: str, quick: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    counter = CollectiveCounter()
    matched_rank = dion_rank(HIDDEN, 1 / 4, 1)
    arms = [("ddp_adamw", lambda: arm_ddp_adamw(layers, world, rank, counter)),
            ("ddp_powersgd", lambda: arm_ddp_powersgd(layers, world, rank, counter,
                                                      matched_rank, quick))]
    arms += [(f"dion_ddp_{f}", lambda f=f: arm_dion_ddp(layers, world, rank, counter, f))
             for f in DION_FRACTIONS]
    arms += [("dion_fsdp", lambda: arm_dion_fsdp(layers, world, rank, counter, FSDP_FRACTION))]
    arms += [("dion2_ddp", lambda: arm_dion_ddp(layers, world, rank, counter, DION2_FRACTION,
                                                "dion2")),
             ("dion2_fsdp", lambda: arm_dion_fsdp(layers, world, rank, counter, DION2_FRACTION,
                                                  "dion2"))]
    results = {}
    for name, run in arms:
        print(f"rank {rank}: {name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results[name] = run()
        results[name]["seconds"] = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"rank {rank}: {name} done, peak RSS {peak:.1f} GiB", file=sys.stderr, flush=True)
        _free()
    with open(out, "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ driver

def launch(world: int, layers: int, tmp: Path, quick: bool) -> list[dict[str, Any]]:
    store = tmp / f"store{world}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [tmp / f"log{world}_{r}" for r in range(world)]
    procs, files = [], []
    for r in range(world):
        # rank 0 reports progress on this terminal; the others write to files (read on failure)
        out = None if r == 0 else open(logs[r], "w")  # closed after wait
        files.append(out)
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", str(r), "--world", str(world), "--layers",
             str(layers), "--store", str(store), "--out", str(tmp / f"out{world}_{r}.json")]
            + (["--quick"] if quick else []),
            env=env, stdout=out, stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    for f in files[1:]:
        f.close()
    failed = [r for r, code in enumerate(codes) if code != 0]
    if failed:
        r = failed[-1]
        log = logs[r].read_text()[-4000:] if r else "(above)"
        sys.exit(f"rank {r} of {world} failed:\n{log}")
    return [json.loads((tmp / f"out{world}_{r}.json").read_text()) for r in range(world)]


def check(ranks: list[dict[str, Any]], world: int) -> list[str]:
    """Every assertion of measured == formula, over every rank; returns the failures."""
    bad = []
    for rank, res in enumerate(ranks):
        ddp = res["ddp_adamw"]["measured"]
        if ddp["by_kind"]["all_reduce:all"]["elements"] != res["ddp_adamw"]["formula"]["all"]:
            bad.append(f"rank {rank} DDP+AdamW: {ddp['by_kind']} != {res['ddp_adamw']['formula']}")
        psgd = res["ddp_powersgd"]
        got = {k.split(":")[1]: v["elements"] for k, v in psgd["measured"]["by_kind"].items()}
        if got != {k: v for k, v in psgd["formula"].items()}:
            bad.append(f"rank {rank} PowerSGD: measured {got} != rule {psgd['formula']}")
        for name in [f"dion_ddp_{f}" for f in DION_FRACTIONS] + ["dion_fsdp", "dion2_ddp",
                                                                  "dion2_fsdp"]:
            arm = res[name]
            ledger = {k: v["elements"] for k, v in arm["ledger"]["by_kind"].items()}
            if ledger != arm["formula"]:
                bad.append(f"rank {rank} {name}: ledger {ledger} != formula {arm['formula']}")
            counted = arm["measured"]
            if (counted["bytes"], counted["collectives"]) != (arm["ledger"]["bytes"],
                                                              arm["ledger"]["collectives"]):
                bad.append(f"rank {rank} {name}: counted {counted['bytes']} B in "
                           f"{counted['collectives']} collectives, ledger says "
                           f"{arm['ledger']['bytes']} B in {arm['ledger']['collectives']}")
            if any(r["ledger"] != arm["steps"][0]["ledger"] for r in arm["steps"]):
                bad.append(f"rank {rank} {name}: ledger differs between steps")
    return bad


def muon_gather(layers: int, world: int) -> dict[str, float]:
    """Computed: under FSDP a Newton-Schulz Muon all-gathers every hidden matrix (its momentum)
    on every rank, each rank handing in its 1/W shard."""
    full = layers * sum(m * n for m, n in BLOCK_SHAPES)
    payload = sum(layers * (chunk(m, world, 0)[1] * n) for m, n in BLOCK_SHAPES) * 4
    return dict(bytes=payload, collectives=layers * len(BLOCK_SHAPES), full_bytes=full * 4,
                ring_bytes=payload * (world - 1))


NOTES = """\
Conventions. *Payload*: bytes handed to each collective, the convention of torchdion's ledger
(an all-reduce's tensor, an all-gather's or reduce-scatter's input). *Ring MB sent / rank*: what
one rank sends with ring algorithms, 2 (W - 1) / W x payload for all-reduce, (W - 1) x payload
for all-gather, (W - 1) / W x payload for reduce-scatter; the ratio column compares these.
*Formula*: torchdion.plan's prediction (Dion; the formulas of docs/design.md), the full gradient
(DDP), PowerSGD's documented rule (torchdion.plan.powersgd_elements); the
benchmark exits non-zero unless every measured Dion ledger equals its formula on every rank, and
equals the collectives counted by wrapping torch.distributed.

- DDP + AdamW: DDP's default 25 MB buckets, each all-reduced by a comm hook through
  torch.distributed.all_reduce, where it is counted; AdamW itself sends nothing.
- DDP + PowerSGD: torch's powerSGD_hook, matrix_approximation_rank 192 (= 768 / 4, Dion's rank
  at 1/4), min_compression_rate 2 (default), start_powerSGD_iter 2; measured on the steps after
  compression starts. It compresses every 2-D gradient with (rows + cols) r x 2 < rows x cols:
  wte and wpe too (which Dion leaves element-wise and sends in full), and not attn c_proj
  (768 x 768 at r = 192 is exactly 2x). One DDP bucket: the hook issues its P and Q all-reduces
  from future callbacks on gloo's threads, and with several buckets the ranks issued them in
  different orders (gloo aborted on a size mismatch). Its bytes do not depend on bucketing; its
  collectives are 3 per bucket.
- Dion compressed: replicate_group = WORLD, no DDP. Per matrix P (a r) and R (b r) elements;
  element-wise parameters (wte's 38.6M elements dominate) send their full gradient.
- FSDP2 + Dion: fully_shard per block and at the root on a 1-D mesh; the optimizer's own
  collectives. FSDP's Shard(0) splits the rows of c_attn, attn c_proj and c_fc (sketch k r,
  Gram r^2, R b r) and the columns of the wide mlp c_proj (P a r, column norms r).
- FSDP2 + Muon: computed, not run. A Newton-Schulz Muon needs each whole matrix: every rank
  all-gathers every matrix's momentum (payload: its shard, m n / W), then runs Newton-Schulz on
  all of them redundantly (a variant that splits the matrices across ranks instead would add a
  scatter of the results).
- Dion2 1/4 (k = 192 of 768 columns): under replicate_group every replica sends its whole
  gradient (the DDP bytes, through the optimizer's own bucketed all-reduce). Under FSDP2, per
  matrix: the 768 L1 column norms over the split axis; for the row-split c_attn, attn c_proj and
  c_fc five Newton-Schulz Grams k^2; for the column-split mlp c_proj the selected columns
  (a_loc k, zero-padded and summed: each rank adds its own). torchdion's Muon is the same at
  k = b (the planner's prediction): its Grams (5 b^2) outweigh gathering a square matrix.
- FSDP2's own traffic: measured in the same FSDP2 run; parameter all-gathers (forward, and again
  in backward for the blocks, as reshard_after_forward defaults to True) and gradient
  reduce-scatters, the same whatever the optimizer.
"""


def _mb(x: float) -> str:
    return f"{x / MB:,.2f}"


def table(ranks: list[dict[str, Any]], world: int, layers: int) -> str:
    res = ranks[0]
    fac = 2 * (world - 1) / world
    base = res["ddp_adamw"]["measured"]["ring_bytes"]
    rows = []

    def row(setup, source, collectives, payload, ring, formula, note=""):
        rows.append(f"| {setup} | {source} | {collectives} | {_mb(payload)} | {_mb(ring)} | "
                    f"{formula} | {ring / base:.3f} | {note} |")

    ddp = res["ddp_adamw"]
    m = ddp["measured"]
    hidden_mb = _mb(ddp["hidden_elements"] * 4)
    row("DDP + AdamW", "comm hook", m["collectives"], m["bytes"], m["ring_bytes"],
        _mb(ddp["formula"]["all"] * 4), f"all gradients; hidden matrices {hidden_mb}")
    p = res["ddp_powersgd"]
    m = p["measured"]
    kinds = {k.split(":")[1]: v["bytes"] for k, v in m["by_kind"].items()}
    row("DDP + PowerSGD r=192", "wrapped all_reduce", m["collectives"], m["bytes"],
        m["ring_bytes"], _mb(sum(p["formula"].values()) * 4) + " (PowerSGD rule)",
        "uncompressed {u}, P {p}, Q {q}".format(u=_mb(kinds.get("uncompressed", 0)),
                                                p=_mb(kinds.get("P", 0)), q=_mb(kinds.get("Q", 0))))
    for f in DION_FRACTIONS:
        d = res[f"dion_ddp_{f}"]
        led = d["ledger"]
        kinds = {k: v["bytes"] for k, v in led["by_kind"].items()}
        row(f"Dion compressed, rank 1/{round(1 / f)}", "opt.comm_stats()", led["collectives"],
            led["bytes"], led["bytes"] * fac, _mb(sum(d["formula"].values()) * 4),
            "element-wise grads {g}, P {p}, R {r}".format(
                g=_mb(kinds.get("grad", 0)), p=_mb(kinds.get("P", 0)), r=_mb(kinds.get("R", 0))))
    d = res["dion_fsdp"]
    led = d["ledger"]
    mu = muon_gather(layers, world)
    kinds = ", ".join(f"{k} {_mb(v['bytes'])}" for k, v in led["by_kind"].items())
    row("FSDP2 + Dion, rank 1/4: optimizer only", "opt.comm_stats()", led["collectives"],
        led["bytes"], led["bytes"] * fac, _mb(sum(d["formula"].values()) * 4),
        f"{kinds}; {led['bytes'] * fac / mu['ring_bytes']:.3f} x the Muon gather")
    row("FSDP2 + Muon (Newton-Schulz): optimizer only", "computed from shapes",
        mu["collectives"], mu["bytes"], mu["ring_bytes"], "-",
        f"all-gather of every matrix: {_mb(mu['full_bytes'])} received-and-held per rank")
    d = res["dion2_ddp"]
    led = d["ledger"]
    row("Dion2 1/4, replicate_group (DDP)", "opt.comm_stats()", led["collectives"], led["bytes"],
        led["bytes"] * fac, _mb(sum(d["formula"].values()) * 4),
        "whole gradients: Dion2 has no compressed replica sync")
    d = res["dion2_fsdp"]
    led = d["ledger"]
    kinds = ", ".join(f"{k} {_mb(v['bytes'])}" for k, v in led["by_kind"].items())
    row("FSDP2 + Dion2 1/4: optimizer only", "opt.comm_stats()", led["collectives"],
        led["bytes"], led["bytes"] * fac, _mb(sum(d["formula"].values()) * 4),
        f"{kinds}; {led['bytes'] * fac / mu['ring_bytes']:.3f} x the Muon gather")
    with torch.device("meta"):
        shapes_model = GPT2Shapes(layers)
    tm = sum(dion_prediction(shapes_model, 1.0, Parallelism(fsdp=world), 0, "muon").values()) * 4
    row("FSDP2 + torchdion Muon: optimizer only", "torchdion.plan (not run)", "-", tm, tm * fac,
        _mb(tm), f"{tm * fac / mu['ring_bytes']:.3f} x the Muon gather: 5 Grams of b x b beat a "
        "gather only for tall matrices")
    own = d["fsdp_own"]
    kinds = ", ".join(f"{k.split(':')[0]} {_mb(v['bytes'])} in {v['collectives']}"
                      for k, v in own["by_kind"].items())
    row("FSDP2's own traffic (any optimizer)", "wrapped collectives", own["collectives"],
        own["bytes"], own["ring_bytes"], "-", kinds)
    head = ("| setup | measured by | collectives / step | payload MB / step | ring MB sent / rank "
            "| formula MB | ring vs DDP + AdamW | breakdown (payload MB) |\n"
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    return f"**world {world}, {layers} layers**\n\n{head}\n" + "\n".join(rows)


def model_summary(layers: int) -> str:
    with torch.device("meta"):
        model = GPT2Shapes(layers)
    total = sum(p.numel() for p in model.parameters())
    hidden = sum(p.numel() for p in model.parameters() if is_hidden(p))
    return (f"GPT-2 small shapes, {layers} layers: {total:,} parameters, {hidden:,} in Dion's "
            f"{4 * layers} hidden matrices, {total - hidden:,} element-wise (AdamW) in wte "
            f"(50257 x 768, the head tied to it), wpe, LayerNorms and biases. fp32.")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--quick", action="store_true", help="2 layers, world 2")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.world[0], args.layers, args.store, args.out, args.quick)
        return
    if args.quick:
        args.layers, args.world = 2, [2]

    command = "python benchmarks/comm.py " + " ".join(sys.argv[1:])
    sections, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.world:
            start = time.perf_counter()
            ranks = launch(world, args.layers, Path(tmp), args.quick)
            failures += [f"world {world}: {b}" for b in check(ranks, world)]
            text = table(ranks, world, args.layers)
            timing = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in ranks[0].items())
            print(text, f"\n\n(world {world}: {time.perf_counter() - start:.0f} s; {timing})\n",
                  flush=True)
            sections.append(text)
    header = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
              f"{cpu_name()} ({os.cpu_count()} cores), "
              f"torch {torch.__version__}, gloo on CPU. Command: `{command}`\n\n"
              + model_summary(args.layers))
    print(header)
    if args.markdown:
        args.markdown.write_text("# Communication per optimizer step\n\n" + header + "\n\n"
                                 + "\n\n".join(sections) + "\n\n" + NOTES)
    if failures:
        sys.exit("measured != formula:\n" + "\n".join(failures))
    print("every Dion ledger equals the planner's prediction and the counted collectives "
          "(Dion2's too)")


if __name__ == "__main__":
    main()
