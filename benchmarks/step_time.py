"""Optimizer-step time on the hidden matrices of GPT-2 small (124M), against peers in one process.

Every arm (Dion at several rank fractions, Dion2 at 1/4 and 1/16, torchdion's Muon,
torch.optim.Muon, a Newton-Schulz Muon in fp32 written here, torch.optim.AdamW) owns a copy of
the same weights and reads the same fixed gradients. The arms are stepped round-robin, one step
each per repetition, so load from other processes lands on all of them alike; the table reports
medians.

Each Dion arm is held to two floors measured in the same run. The first is issue 12's: its
matmul work, 8 m n r FLOPs per matrix (B Q, B^T P, the error feedback P R^T and the update
P Q^T), at the rate of batched matmuls shaped like B Q in the arm's dtype (bf16 for
``matmul_dtype=torch.bfloat16``), plus the orthonormalization of P (sketch product, Gram,
Cholesky, triangular solves; the sketch product in bf16 for bf16 arms) timed on its own. The
second adds the memory traffic no optimizer with momentum avoids (M += G and W *= c over every
weight, timed): once the products run at bf16 speed, a step is mostly such passes, which the
first floor leaves out. ``--profile`` breaks one step of an arm down by category. On CUDA,
``--tf32`` adds fp32 arms run with TF32 matmuls.

    python benchmarks/step_time.py                  # 12 layers, the full table
    python benchmarks/step_time.py --layers 2 --repeats 3   # a quick run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import torchdion

# (out, in) of the four matrices of one GPT-2 small block: c_attn, c_proj, c_fc, mlp c_proj.
BLOCK_SHAPES = ((2304, 768), (768, 768), (3072, 768), (768, 3072))
RANK_FRACTIONS = (1.0, 0.25, 1 / 16)
DION2_FRACTIONS = (0.25, 1 / 16)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def make_weights(layers: int, device: torch.device, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=gen).mul_(0.02).to(device)
        for _ in range(layers)
        for shape in BLOCK_SHAPES
    ]


def make_grads(weights: list[Tensor], seed: int = 1) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(w.shape, generator=gen).mul_(1e-3).to(w.device) for w in weights]


def make_params(weights: list[Tensor], grads: list[Tensor]) -> list[nn.Parameter]:
    # Gradients are shared between arms: no optimizer here writes into p.grad.
    params = [nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    return params


class NewtonSchulzMuon(torch.optim.Optimizer):
    """Muon with its quintic Newton-Schulz iteration run in fp32: the reference for orthonormal
    updates computed without low precision, which Dion's fp32 math is compared against."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.1, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      ns_steps=ns_steps))

    @staticmethod
    def orthogonalize(G: Tensor, steps: int) -> Tensor:
        a, b, c = NS_COEFFICIENTS
        # Iterate on the wide orientation so that the Gram matrix X X^T is the small one.
        wide = G.shape[0] > G.shape[1]
        X = G.mT if wide else G
        X = X / X.norm().clamp_min(1e-7)
        for _ in range(steps):
            A = X @ X.mT
            Bm = torch.addmm(A, A, A, beta=b, alpha=c)
            X = torch.addmm(X, Bm, X, beta=a)
        return X.mT if wide else X

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["buf"] = torch.zeros_like(p)
                buf = state["buf"]
                buf.lerp_(p.grad, 1 - mom)
                U = self.orthogonalize(p.grad.lerp(buf, mom), group["ns_steps"])
                p.mul_(1 - lr * wd)
                p.add_(U, alpha=-lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def dion_flops(layers: int, rank_fraction: float) -> float:
    total = 0.0
    for m, n in BLOCK_SHAPES:
        r = torchdion.matrix_plan.dion_rank(min(m, n), rank_fraction, 1)
        total += layers * 8.0 * m * n * r
    return total


def matmul_probes(layers: int, device: torch.device, dtype: torch.dtype = torch.float32):
    """For each rank fraction, batched matmuls shaped like B Q of one Dion step:
    (layers, a, b) @ (layers, b, r) per matrix shape. The B operands are shared to save memory."""
    gen = torch.Generator().manual_seed(2)
    operands = {}
    for m, n in BLOCK_SHAPES:
        a, b = max(m, n), min(m, n)
        if (a, b) not in operands:
            operands[(a, b)] = torch.randn(layers, a, b, generator=gen).to(device, dtype)
    runs = {}
    for f in RANK_FRACTIONS:
        work, flops = [], 0.0
        for m, n in BLOCK_SHAPES:
            B = operands[(max(m, n), min(m, n))]
            r = torchdion.matrix_plan.dion_rank(B.shape[-1], f, 1)
            Q = torch.randn(layers, B.shape[-1], r, generator=gen).to(device, dtype)
            work.append((B, Q, torch.empty(layers, B.shape[-2], r, device=device, dtype=dtype)))
            flops += 2.0 * layers * B.shape[-2] * B.shape[-1] * r

        def run(work=work):
            for B, Q, out in work:
                torch.bmm(B, Q, out=out)

        runs[f] = (run, flops)
    return runs


def memory_probe(layers: int, device: torch.device) -> Callable[[], None]:
    """The least memory traffic of an optimizer with momentum, on fp32 tensors shaped like the
    weights: M += G (reads G and M, writes M) and W *= c (reads and writes W). Dion's step
    moves at least this much besides its products; it is what AdamW's step mostly is."""
    tensors = [[torch.ones(shape, device=device) for _ in range(3)]
               for _ in range(layers) for shape in BLOCK_SHAPES]

    def run():
        for M, G, W in tensors:
            M.add_(G)
            W.mul_(0.999)
    return run


def orthonormalize_probes(layers: int, device: torch.device,
                          sketch_dtype: torch.dtype = torch.float32):
    """For each rank fraction, the default (randomized) orthonormalization of P-shaped fp32
    batches (layers, a, r), its sketch product in ``sketch_dtype`` (bf16 where Dion's products
    are): the part of a bf16-matmul step that stays fp32."""
    from torchdion.orthonormalize import orthonormalize, sketch_matrix, sketch_rows
    from torchdion.reduce import run_lockstep

    gen = torch.Generator().manual_seed(3)
    runs = {}
    for f in RANK_FRACTIONS:
        work = []
        for m, n in BLOCK_SHAPES:
            a, b = max(m, n), min(m, n)
            r = torchdion.matrix_plan.dion_rank(b, f, 1)
            P = torch.randn(layers, r, a, generator=gen).to(device).mT  # column-major, as in Dion
            sketch = sketch_matrix(sketch_rows(r, a), a, 0, 1, device, torch.float32
                                   ).to(sketch_dtype)
            work.append((P, sketch))

        def run(work=work):
            run_lockstep([orthonormalize(P.clone(memory_format=torch.preserve_format),
                                         "randomized", sk, overwrite=True) for P, sk in work],
                         [None] * len(work))

        runs[f] = run
    return runs


MATMULS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addmm_",
           "aten::baddbmm_"}


def profile_step(opt: torch.optim.Optimizer, device: torch.device) -> dict[str, tuple[float, int]]:
    """Where one step's time goes: {category: (self time in seconds, op calls)}.

    An operand is "full" when both of its last two dims are at least the blocks' short side
    (768), i.e. (a, b)-sized rather than a thin (a, r) factor at rank < 1. Matmuls with a full
    operand are the big products; other matmuls and the linalg ops are the orthonormalization
    of P (its sketch, Gram, QR, Cholesky and solves, and drawing the sketch); the rest are
    element-wise passes, over full matrices or thin factors. "Python and dispatch" is the
    step's own time outside every op.
    """
    from torch.profiler import ProfilerActivity, profile

    short = min(min(shape) for shape in BLOCK_SHAPES)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    sync(device)
    with profile(activities=activities, record_shapes=True) as prof:
        opt.step()
        sync(device)
    out: dict[str, list[float]] = {}
    for e in prof.key_averages(group_by_input_shape=True):
        full = any(len(s) >= 2 and min(s[-2:]) >= short for s in e.input_shapes
                   if isinstance(s, list))
        if e.key.startswith("Optimizer.step"):
            cat = "Python and dispatch"
        elif e.key in MATMULS:
            cat = "big products (8 a b r)" if full else "orthonormalization of P"
        elif e.key.startswith("aten::linalg") or e.key in ("aten::normal_", "aten::tril",
                                                            "aten::triu"):
            cat = "orthonormalization of P"
        elif e.key.startswith("aten::") and full:
            cat = "element-wise passes over (a, b)"
        elif e.key.startswith("aten::") and e.input_shapes and any(e.input_shapes):
            cat = "element-wise over thin factors"
        else:
            continue  # views and wrappers: their children are counted
        t = (e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total) / 1e6
        acc = out.setdefault(cat, [0.0, 0])
        acc[0] += t
        acc[1] += e.count
    return {k: (v[0], int(v[1])) for k, v in sorted(out.items(), key=lambda kv: -kv[1][0])}


def profile_table(name: str, parts: dict[str, tuple[float, int]]) -> str:
    total = sum(t for t, _ in parts.values())
    lines = [f"Where one step of {name} goes (torch.profiler, self time by category; "
             f"profiled {fmt_time(total)}):", "",
             "| category | time | share | op calls |", "|---|---|---|---|"]
    lines += [f"| {k} | {fmt_time(t)} | {t / total:.0%} | {n} |" for k, (t, n) in parts.items()]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s >= 0.1 else f"{s * 1e3:.1f} ms"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per arm (after 2 warm-ups)")
    ap.add_argument("--layers", type=int, default=12,
                    help="transformer blocks (12 for GPT-2 small; fewer for a quick run)")
    ap.add_argument("--out", default=None, help="also write the table as markdown to this file")
    ap.add_argument("--skip", default="", help="comma-separated arm names to leave out")
    ap.add_argument("--no-bf16", action="store_true", help="leave out the bf16-matmul Dion arms")
    ap.add_argument("--no-fp32-muon", action="store_true",
                    help="leave out the fp32 Newton-Schulz Muon (the slowest arm)")
    ap.add_argument("--tf32", action="store_true",
                    help="CUDA: add Dion arms whose fp32 matmuls run in TF32")
    ap.add_argument("--compile", action="store_true",
                    help="add a 'compiled' twin (Dion(compile=True)) of every Dion arm; each "
                         "compiles on its untimed first step")
    ap.add_argument("--dion-options", default=None, metavar="JSON",
                    help='also time Dion with these options at every rank, e.g. '
                         '\'{"nesterov": true}\'')
    ap.add_argument("--profile", default="Dion rank 1/4 bf16", metavar="ARM",
                    help="after timing, break one step of this arm down by category "
                         "('' for none)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    weights = make_weights(args.layers, device)
    grads = make_grads(weights)
    n_params = sum(w.numel() for w in weights)

    arms: dict[str, torch.optim.Optimizer] = {}
    tf32_arms: set[str] = set()
    # The floors count the paper's four products: these arms step the paper's Dion. The
    # library's default adds the lookahead (one more product), timed in its own rows.
    paper = dict(nesterov=False)
    for f in RANK_FRACTIONS:
        arms[_dion_name(f)] = torchdion.Dion(make_params(weights, grads), lr=0.01, rank_fraction=f,
                                             **paper)
        if not args.no_bf16:
            arms[_dion_name(f) + " bf16"] = torchdion.Dion(
                make_params(weights, grads), lr=0.01, rank_fraction=f,
                matmul_dtype=torch.bfloat16, **paper)
        if args.tf32 and device.type == "cuda":
            arms[_dion_name(f) + " TF32"] = torchdion.Dion(make_params(weights, grads), lr=0.01,
                                                          rank_fraction=f, **paper)
            tf32_arms.add(_dion_name(f) + " TF32")
    for md, suffix in ((None, ""), (torch.bfloat16, " bf16")):
        if md is None or not args.no_bf16:
            arms[f"Dion rank 1/4 defaults (lookahead){suffix}"] = torchdion.Dion(
                make_params(weights, grads), lr=0.01, rank_fraction=0.25, matmul_dtype=md)
    for f in RANK_FRACTIONS:
        if args.dion_options:
            options = json.loads(args.dion_options)
            arms[f"{_dion_name(f)} {args.dion_options}"] = torchdion.Dion(
                make_params(weights, grads), lr=0.01, rank_fraction=f, **options)
    if args.compile:
        for name in [n for n in arms if n.startswith("Dion rank") and not n.endswith("TF32")]:
            group = arms[name].param_groups[0]
            arms[name + " compiled"] = torchdion.Dion(
                make_params(weights, grads), lr=0.01, rank_fraction=group["rank_fraction"],
                matmul_dtype=group["matmul_dtype"], nesterov=group["nesterov"], compile=True)
    for f in DION2_FRACTIONS:
        arms[f"Dion2 1/{round(1 / f)}"] = torchdion.Dion(make_params(weights, grads), lr=0.01,
                                                         rank_fraction=f, algorithm="dion2")
    arms["torchdion Muon (fp32 NS)"] = torchdion.Dion(
        make_params(weights, grads), lr=0.02, algorithm="muon", nesterov=True, lr_scale="muon")
    if not args.no_bf16:  # Newton-Schulz's products in bf16, as torch.optim.Muon's
        arms["torchdion Muon (bf16 NS)"] = torchdion.Dion(
            make_params(weights, grads), lr=0.02, algorithm="muon", nesterov=True,
            lr_scale="muon", matmul_dtype=torch.bfloat16)
    # Muon as shipped runs its Newton-Schulz iteration in bf16.
    arms["torch.optim.Muon (bf16 NS)"] = torch.optim.Muon(make_params(weights, grads), lr=0.02)
    if not args.no_fp32_muon:
        arms["Muon NS-5 fp32"] = NewtonSchulzMuon(make_params(weights, grads), lr=0.02)
    arms["torch.optim.AdamW"] = torch.optim.AdamW(make_params(weights, grads), lr=1e-3)
    del weights  # every arm holds its own copy; this one would only take memory
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    arms = {k: v for k, v in arms.items() if k not in skip}

    probes = matmul_probes(args.layers, device)
    bf16_probes = {} if args.no_bf16 else matmul_probes(args.layers, device, torch.bfloat16)
    orth_probes = {(f, torch.float32): run
                   for f, run in orthonormalize_probes(args.layers, device).items()}
    if not args.no_bf16:
        orth_probes.update({(f, torch.bfloat16): run for f, run in orthonormalize_probes(
            args.layers, device, torch.bfloat16).items()})
    memory = memory_probe(args.layers, device)
    times: dict[str, list[float]] = {name: [] for name in arms}
    probe_times: dict[float, list[float]] = {f: [] for f in RANK_FRACTIONS}
    bf16_times: dict[float, list[float]] = {f: [] for f in bf16_probes}
    orth_times: dict[tuple[float, torch.dtype], list[float]] = {k: [] for k in orth_probes}
    memory_times: list[float] = []

    def step_of(name: str, opt) -> Callable[[], object]:
        if name not in tf32_arms:
            return opt.step

        def step():
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                opt.step()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False
        return step

    # The first step of each arm builds its state and the second its reused buffers (Dion's
    # workspace is sized by the step before); neither is timed.
    for name, opt in arms.items():
        timed(step_of(name, opt), device)
        timed(step_of(name, opt), device)
    for run, _ in [*probes.values(), *bf16_probes.values()]:
        timed(run, device)
    for run in [*orth_probes.values(), memory]:
        timed(run, device)
    load_before = os.getloadavg()[0]
    for rep in range(args.repeats):
        print(f"repetition {rep + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for name, opt in arms.items():
            times[name].append(timed(step_of(name, opt), device))
        for f, (run, _) in probes.items():
            probe_times[f].append(timed(run, device))
        for f, (run, _) in bf16_probes.items():
            bf16_times[f].append(timed(run, device))
        for key, run in orth_probes.items():
            orth_times[key].append(timed(run, device))
        memory_times.append(timed(memory, device))

    load_after = os.getloadavg()[0]
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rate = {f: flops / statistics.median(probe_times[f]) for f, (_, flops) in probes.items()}
    bf16_rate = {f: flops / statistics.median(bf16_times[f])
                 for f, (_, flops) in bf16_probes.items()}
    orth = {key: statistics.median(ts) for key, ts in orth_times.items()}
    mem = statistics.median(memory_times)
    adamw = med.get("torch.optim.AdamW")
    ns = med.get("Muon NS-5 fp32")
    muon = med.get("torch.optim.Muon (bf16 NS)")

    rows = []
    for name, t in med.items():
        floor, with_memory, vs_fp32 = "-", "-", "-"
        for f in RANK_FRACTIONS:
            fl = None
            if name in (_dion_name(f), _dion_name(f) + " TF32"):
                fl = dion_flops(args.layers, f) / rate[f] + orth[(f, torch.float32)]
            if name == _dion_name(f) + " bf16":
                fl = dion_flops(args.layers, f) / bf16_rate[f] + orth[(f, torch.bfloat16)]
            if fl is not None:
                floor = f"{fmt_time(fl)} ({t / fl:.2f}x)"
                with_memory = f"{fmt_time(fl + mem)} ({t / (fl + mem):.2f}x)"
        base = name.removesuffix(" compiled").removesuffix(" bf16").removesuffix(" TF32")
        if base != name and base in med:  # the same arm with fp32 products, eager
            vs_fp32 = f"{med[base] / t:.2f}x"
        rows.append((
            name,
            fmt_time(t),
            f"{t / adamw:.1f}x" if adamw else "-",
            f"{ns / t:.2f}x" if ns else "-",
            f"{muon / t:.2f}x" if muon else "-",
            vs_fp32,
            floor,
            with_memory,
        ))
    header = ("optimizer", "median step", "time / AdamW", "speedup vs NS-5 fp32 Muon",
              "speedup vs torch.optim.Muon", "speedup vs fp32 Dion",
              "floor: products + orthonormalization (step / floor)",
              "floor + memory passes (step / floor)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    rates = ", ".join(
        f"{_dion_name(f).removeprefix('Dion ')}: {rate[f] / 1e9:.0f} GFLOP/s"
        for f in RANK_FRACTIONS
    )
    rates += "; orthonormalization (fp32 sketch) " + ", ".join(
        f"{_dion_name(f).removeprefix('Dion ')}: {fmt_time(orth[(f, torch.float32)])}"
        for f in RANK_FRACTIONS)
    if bf16_rate:
        rates += "; bf16 " + ", ".join(
            f"{_dion_name(f).removeprefix('Dion ')}: {bf16_rate[f] / 1e9:.0f} GFLOP/s, "
            f"orthonormalization with a bf16 sketch {fmt_time(orth[(f, torch.bfloat16)])}"
            for f in RANK_FRACTIONS)
    rates += f"; memory passes (M += G, W *= c over all weights) {fmt_time(mem)}"
    threads = torch.get_num_threads()
    now = datetime.datetime.now(datetime.timezone.utc)
    info = (
        f"{args.layers} layers x 4 matrices ({n_params / 1e6:.1f}M weights), fp32, "
        f"device {device}, {args.repeats} timed steps per arm (round-robin), medians.\n"
        f"fp32 matmul rate measured on batched B Q-shaped matmuls ({rates}).\n"
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {threads} torch threads, "
        f"torch {torch.__version__}, {now:%Y-%m-%d %H:%M} UTC; 1-minute load average "
        f"{load_before:.1f} before the timed steps, {load_after:.1f} after."
    )
    table = "\n".join(lines)
    print(table)
    print()
    print(info)
    breakdown = ""
    if args.profile in arms:
        breakdown = profile_table(args.profile, profile_step(arms[args.profile], device))
        print()
        print(breakdown)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table + "\n\n" + info.replace("\n", "  \n") + "\n")
            if breakdown:
                f.write("\n" + breakdown + "\n")


def _dion_name(f: float) -> str:
    return f"Dion rank 1/{round(1 / f)}" if f < 1 else "Dion rank 1 (full)"


if __name__ == "__main__":
    main()
