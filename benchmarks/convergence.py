"""Convergence on character-level Shakespeare: AdamW, Muon, Dion at rank fractions 1 to 1/16,
Dion2 at fractions 1/4 and 1/16, and Muon through torchdion.

Every arm trains the same GPT on the same batches (single process, in this process). Each arm
first sweeps its learning rate on a log grid with seed 0, then reruns its best lr with more seeds.
AdamW is swept first: its best lr then serves as the AdamW lr of the element-wise parameters
(embeddings, head, norms) of the Muon and Dion arms, so those arms differ only in how they
update the hidden matrices.

    python benchmarks/convergence.py            # the full run, writes benchmarks/results/
    python benchmarks/convergence.py --quick    # about a minute, writes runs/convergence-quick/
    python benchmarks/convergence.py --arms "Dion r=1/16"   # rerun one arm, keep the others

Arms named "Dion r=<rank> <variant>" run Dion with one of the VARIANTS' options (issue 15's
candidates); a run already in --runs with the same settings is reused, so arms can be added and
sweeps extended one at a time, and --cached-only reports what has run without training.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from torchdion.train import TrainConfig, train
from torchdion.train.data import load_data

ROOT = Path(__file__).resolve().parent
RANKS = {"1": 1.0, "1/2": 0.5, "1/4": 0.25, "1/8": 0.125, "1/16": 0.0625}
# The paper's Dion, which was the library's default before issue 15: every Dion arm states it,
# so that an arm runs the same thing whatever the library's defaults (since issue 15 Dion's
# defaults are the arm "nesterov+muon scale").
PLAIN = dict(nesterov=False, lr_scale="spectral")
# Dion's options (issue 15's candidates) over PLAIN, each an arm at ranks 1, 1/4 and 1/16
VARIANTS = {
    "nesterov": dict(nesterov=True),
    "polar": dict(polar_q=True),
    "muon scale": dict(lr_scale="muon"),
    "nesterov+polar+muon scale": dict(nesterov=True, polar_q=True, lr_scale="muon"),
    "tol 0.1": dict(direction_tol=0.1),
    "tol 0.01": dict(direction_tol=0.01),
    "nesterov+muon scale": dict(nesterov=True, lr_scale="muon"),
}
VARIANT_RANKS = ("1", "1/4", "1/16")
# (name, optimizer, rank fraction, Dion options)
ARMS = [("AdamW", "adamw", 1.0, {}), ("Muon", "muon", 1.0, {})]
ARMS += [(f"Dion r={k}", "dion", rf, dict(PLAIN)) for k, rf in RANKS.items()]
ARMS += [("Dion2 1/4", "dion2", 0.25, {}), ("Dion2 1/16", "dion2", 0.0625, {}),
         ("Muon (torchdion)", "muon-torchdion", 1.0, {})]
BASELINE = [name for name, *_ in ARMS]  # what a run without --arms runs
ARMS += [(f"Dion r={k} {v}", "dion", RANKS[k], {**PLAIN, **opts}) for v, opts in VARIANTS.items()
         for k in VARIANT_RANKS]
ARMS += [("Dion r=1/4, bf16 matmuls", "dion", 0.25, dict(PLAIN))]
# Trainer settings beyond the optimizer's, and arms that sweep fewer lrs (around the best lr of
# the arm they vary) to keep the run short.
ARM_SETTINGS = {"Dion r=1/4, bf16 matmuls": dict(matmul_dtype="bf16")}
ARM_LRS = {"Dion r=1/4, bf16 matmuls": [0.01, 0.02, 0.04]}
ARM_LRS.update({f"Dion r={k} {v}": [0.01, 0.02, 0.04] for v in VARIANTS for k in VARIANT_RANKS})
MATRIX_LRS = [0.005, 0.01, 0.02, 0.04, 0.08]
ADAMW_LRS = [0.00125, 0.0025, 0.005, 0.01, 0.02]


def base_config(quick: bool) -> TrainConfig:
    if quick:
        return TrainConfig(nproc=1, n_layer=1, n_head=2, d_model=32, seq_len=32, batch=8,
                           steps=20, warmup=2, eval_interval=5, eval_batches=2, sample_chars=0,
                           progress=False, plots=False)
    return TrainConfig(nproc=1, n_layer=4, n_head=4, d_model=128, seq_len=64, batch=16,
                       steps=300, warmup=30, eval_interval=25, eval_batches=8, sample_chars=0,
                       progress=False, plots=False)


def run_one(cfg: TrainConfig, cached_only: bool = False) -> dict | None:
    """Train one run, or reuse its result when its directory holds one of the same config.
    ``cached_only``: None instead of training."""
    done = Path(cfg.out) / "result.json"
    if done.exists():
        saved = json.loads(done.read_text())
        # a setting the saved config lacks (added to TrainConfig since) had its default then;
        # the directory is the run's, wherever --runs put it
        now, default = (json.loads(json.dumps(asdict(c))) for c in (cfg, TrainConfig()))
        if all(saved["config"].get(k, default[k]) == v for k, v in now.items() if k != "out"):
            return saved["result"]
    if cached_only:
        return None
    s = train(replace(cfg, overwrite=True))  # a run killed before its result is redone
    evals = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text()
             .splitlines()]
    evals = [(r["step"], r["val_loss"]) for r in evals if r["kind"] == "eval"]
    result = dict(lr=cfg.resolved_lr(), seed=cfg.seed, val_loss=s["val_loss"], curve=evals,
                  train_time=s["train_time"], unigram=s["unigram_loss"])
    done.write_text(json.dumps(dict(config=asdict(cfg), result=result)))
    return result


def lowest(runs: list) -> dict:
    """The run with the lowest final loss (a diverged run counts as worst)."""
    return min(runs, key=lambda r: r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf)


def steps_to(curve: list, target: float) -> float:
    return next((step for step, loss in curve if loss <= target), math.nan)


def fmt(x: float, spec: str = ".3f") -> str:
    return "-" if isinstance(x, float) and math.isnan(x) else format(x, spec)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and grids: about a minute")
    p.add_argument("--seeds", type=int, default=None, help="seeds at the best lr (default 3)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="results directory")
    p.add_argument("--runs", default=None, help="directory for the runs' own files")
    p.add_argument("--cached-only", action="store_true",
                   help="train nothing: report the runs already in --runs (lrs and seeds "
                        "without a run are left out)")
    p.add_argument("--adam-lr", type=float, default=None,
                   help="AdamW lr of the embeddings, head and norms in the Muon and Dion arms "
                        "(default: AdamW's best lr in the results directory)")
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help=f"the matrix lr grid (default {MATRIX_LRS})")
    p.add_argument("--lrs-from", default=None,
                   help="a convergence.json: each arm runs only its best lr there (and the "
                        "AdamW lr of the element-wise parameters is AdamW's best there): the "
                        "longer horizon at the short run's lrs")
    p.add_argument("--arms", nargs="+", choices=[name for name, *_ in ARMS], default=None,
                   help="run only these arms; the others are read from the results directory's "
                        "convergence.json (AdamW's best lr from there sets the element-wise lr)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    quick = args.quick
    base = base_config(quick)
    if args.steps:
        base = replace(base, steps=args.steps, warmup=max(1, args.steps // 10),
                       eval_interval=max(1, args.steps // 12))
    seeds = args.seeds or (2 if quick else 3)
    matrix_lrs = args.lrs or (MATRIX_LRS[1:4:2] if quick else MATRIX_LRS)
    adamw_lrs = ADAMW_LRS[1:4:2] if quick else ADAMW_LRS
    out = Path(args.out) if args.out else (Path("runs/convergence-quick") if quick
                                           else ROOT / "results")
    runs = Path(args.runs) if args.runs else Path("runs") / ("convergence-quick" if quick
                                                             else "convergence")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data = load_data()

    results = {}
    adam_lr = base.adam_lr
    chosen = args.arms or BASELINE
    if args.arms and (out / "convergence.json").exists():
        earlier = json.loads((out / "convergence.json").read_text())["arms"]
        results = {n: a for n, a in earlier.items() if n not in args.arms}
        adam_lr = earlier["AdamW"]["best_lr"] if "AdamW" in results else adam_lr
    best_lrs = {}
    if args.lrs_from:
        best_lrs = {n: a["best_lr"] for n, a in
                    json.loads(Path(args.lrs_from).read_text())["arms"].items()}
        adam_lr = best_lrs.get("AdamW", adam_lr)
    adam_lr = args.adam_lr or adam_lr
    for name, kind, rf, opts in sorted(ARMS, key=lambda arm: chosen.index(arm[0])
                                       if arm[0] in chosen else len(chosen)):
        if name in results or name not in chosen:  # in the order asked for
            continue
        if name in best_lrs:
            lrs = [best_lrs[name]]
        elif kind == "adamw":
            lrs = adamw_lrs
        else:  # an explicit --lrs over the arm's own grid
            lrs = args.lrs or ARM_LRS.get(name, matrix_lrs)
        arm = replace(base, optimizer=kind, rank_fraction=rf, adam_lr=adam_lr,
                      dion_options=dict(opts), **ARM_SETTINGS.get(name, {}))
        tag = (name.replace(" ", "").replace("/", "_").replace("=", "").replace("+", "_")
               .replace(",", "_"))
        sweep = []
        for lr in lrs:
            run = run_one(replace(arm, lr=lr, seed=0, out=str(runs / tag / f"lr{lr}_s0")),
                          args.cached_only)
            if run is None:
                continue
            sweep.append(run)
            print(f"[{time.time() - started:6.0f}s] {name} lr {lr:g}: "
                  f"val {sweep[-1]['val_loss']:.4f}", flush=True)
        if not sweep:
            continue
        best = lowest(sweep)
        if len(lrs) >= 3 and best["lr"] in (min(lrs), max(lrs)):
            # the best at the grid's edge: one more lr beyond it, so that the best is bracketed
            lr = best["lr"] * 2 if best["lr"] == max(lrs) else best["lr"] / 2
            run = run_one(replace(arm, lr=lr, seed=0, out=str(runs / tag / f"lr{lr}_s0")),
                          args.cached_only)
            if run is not None:
                sweep = sorted(sweep + [run], key=lambda r: r["lr"])
                print(f"[{time.time() - started:6.0f}s] {name} lr {lr:g} (beyond the grid): "
                      f"val {run['val_loss']:.4f}", flush=True)
                best = lowest(sweep)
        seeded = [best] + [
            run_one(replace(arm, lr=best["lr"], seed=s,
                            out=str(runs / tag / f"lr{best['lr']}_s{s}")), args.cached_only)
            for s in range(1, seeds)]
        seeded = [r for r in seeded if r is not None]
        finals = [r["val_loss"] for r in seeded]
        print(f"[{time.time() - started:6.0f}s] {name}: best lr {best['lr']:g}, "
              f"val {statistics.mean(finals):.4f} over {seeds} seeds", flush=True)
        results[name] = dict(optimizer=kind, rank_fraction=rf, options=opts, sweep=sweep,
                             seeds=seeded,
                             best_lr=best["lr"], adam_lr=adam_lr if kind != "adamw" else None,
                             at_edge=len(sweep) > 1
                             and best["lr"] in (sweep[0]["lr"], sweep[-1]["lr"]))
        if kind == "adamw":
            adam_lr = best["lr"]

    results = {name: results[name] for name, *_ in ARMS if name in results}
    # The target is AdamW's mean final loss: how soon each arm reaches what AdamW ends at.
    target = (statistics.mean(r["val_loss"] for r in results["AdamW"]["seeds"])
              if "AdamW" in results else math.nan)
    for a in results.values():
        a["steps_to_target"] = [steps_to(r["curve"], target) for r in a["seeds"]]
    elapsed = sum(r["train_time"] for a in results.values() for r in a["sweep"] + a["seeds"][1:])
    command = "python benchmarks/convergence.py" + (" " + shlex.join(argv or sys.argv[1:])
                                                    if (argv or sys.argv[1:]) else "")
    write_report(out, results, base, seeds, target, data.unigram_loss(), elapsed, command)
    print(f"wrote {out / 'convergence.md'} and {out / 'convergence.png'} in {elapsed:.0f} s")


def write_report(out: Path, results: dict, base: TrainConfig, seeds: int, target: float,
                 unigram: float, elapsed: float, command: str) -> None:
    (out / "convergence.json").write_text(json.dumps(dict(
        config=asdict(base), seeds=seeds, target=target, unigram=unigram, arms=results),
        indent=1))
    lines = [
        "# Convergence: AdamW, Muon, Dion and Dion2 on character-level Shakespeare", "",
        f"Command: `{command}` ({elapsed / 60:.1f} min of training in all arms on the shared "
        f"2-core CPU, one process, {torch.get_num_threads()} thread).", "",
        f"Model: GPT, {base.n_layer} layers, d_model {base.d_model}, {base.n_head} heads, "
        f"context {base.seq_len}; batch {base.batch} sequences ({base.batch * base.seq_len} "
        f"characters) per step, {base.steps} steps, warmup {base.warmup}, {base.decay} decay to "
        f"{base.min_lr_ratio} of the peak lr, weight decay {base.weight_decay}, AdamW betas "
        f"(0.9, 0.95). Validation loss on {base.eval_batches} fixed batches of the held-out "
        f"split (nats/char; unigram baseline {unigram:.3f}), every {base.eval_interval} steps.", "",
        "Protocol: each arm sweeps its lr with seed 0 and keeps the lowest final validation loss; "
        f"that lr is rerun with seeds 1..{seeds - 1} (seed sets initial weights, batch order and "
        "Dion's sketches). AdamW is swept first and its best lr becomes the AdamW lr of the "
        "embeddings, head and norms in the Muon and Dion arms. Muon is torch.optim.Muon "
        "(Newton-Schulz, default lr adjustment). 'Dion r=...' is the paper's Dion "
        "(nesterov=False, the spectral scale sqrt(m/n)); 'Dion r=... <option>' adds the "
        "option(s) to it, and 'nesterov+muon scale' is the library's default since issue 15. "
        "Dion2 is torchdion's algorithm='dion2' (rank_fraction is its fraction, mu = 0.95 its "
        "ef_decay, 5 Newton-Schulz steps in fp32, spectral scale); Muon (torchdion) is "
        "algorithm='muon' set up as torch.optim.Muon is (Nesterov, sqrt(max(1, m/n)), mu 0.95) "
        "but with its Newton-Schulz in fp32. An arm whose sweep lists fewer lrs ran on a "
        "reduced grid (--lrs, or an option's 3-lr grid, extended by one lr where the best was "
        "at its edge). "
        f"Target loss for 'steps to target' = AdamW's mean final loss, {target:.3f}.", "",
        "| arm | best lr | final val loss (mean ± std) | steps to target (mean) | "
        "lr sweep (lr: final loss, seed 0) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, a in results.items():
        finals = [r["val_loss"] for r in a["seeds"]]
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        st = [s for s in a["steps_to_target"] if not math.isnan(s)]
        reach = fmt(statistics.mean(st), ".0f") if st else "-"
        if len(st) < len(finals):
            reach += f" ({len(st)}/{len(finals)} seeds)"
        sweep = ", ".join(f"{r['lr']:g}: {fmt(r['val_loss'])}" for r in a["sweep"])
        edge = " (grid edge)" if a["at_edge"] else ""
        spread = (f"{statistics.mean(finals):.4f} ± {std:.4f}" if len(finals) == seeds else
                  f"{statistics.mean(finals):.4f} ({len(finals)} seed{'s' * (len(finals) > 1)})")
        lines.append(f"| {name} | {a['best_lr']:g}{edge} | {spread} | {reach} | {sweep} |")
    lines += variant_table(results, seeds)
    lines += ["", "![validation loss curves](convergence.png)", ""]
    (out / "convergence.md").write_text("\n".join(lines))
    plot(out / "convergence.png", results, target)


def variant_table(results: dict, seeds: int) -> list[str]:
    """Each option against the paper's Dion at the same rank: issue 15's decision rule (a win
    at every rank by more than the seeds' spread) as a table. Difference = the paper's Dion's mean
    minus the variant's (positive: the variant ends lower); spread = the larger of the two
    stds."""
    def stats(name):
        finals = [r["val_loss"] for r in results[name]["seeds"]]
        if len(finals) < max(seeds, 2):  # a spread needs two seeds
            return None
        return statistics.mean(finals), statistics.stdev(finals)

    ranks = [k for k in VARIANT_RANKS if f"Dion r={k}" in results]
    rows = []
    for v in VARIANTS:
        cells, wins = [], []
        for k in ranks:
            mine, default = f"Dion r={k} {v}", f"Dion r={k}"
            got = stats(mine) if mine in results else None
            if got is None:
                cells.append("-" if mine not in results else f"(< {max(seeds, 2)} seeds)")
                wins.append(None)
                continue
            ref = stats(default)
            diff, spread = ref[0] - got[0], max(ref[1], got[1])
            cells.append(f"{diff:+.3f} ({spread:.3f})")
            wins.append(diff > spread)
        if all(w is None for w in wins):
            continue
        tested = [w for w in wins if w is not None]
        verdict = ("yes" if all(tested) and len(tested) == len(ranks) else
                   "no" if not all(tested) else "not every rank measured")
        rows.append(f"| {v} | " + " | ".join(cells) + f" | {verdict} |")
    if not rows:
        return []
    return ["", f"Options against the paper's Dion (each arm at its own best lr, {seeds} seeds): "
            "the mean final loss of 'Dion r=...' minus the option's (positive: the option ends "
            "lower), "
            "in brackets the larger of the two arms' seed stds. A win by more than the spread "
            "at every rank is the issue's bar for a new default (with no loss at the longer "
            "horizon).", "",
            "| option | " + " | ".join(f"r = {k}" for k in ranks)
            + " | wins at every rank |",
            "| --- | " + " | ".join("---:" for _ in ranks) + " | --- |", *rows]


def plot(path: Path, results: dict, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, arm in results.items():
        curves = [r["curve"] for r in arm["seeds"]]
        steps = [s for s, _ in curves[0]]
        mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
        line, = a.plot(steps, mean, label=f"{name} (lr {arm['best_lr']:g})")
        if len(curves) > 1:
            lo = [min(c[i][1] for c in curves) for i in range(len(steps))]
            hi = [max(c[i][1] for c in curves) for i in range(len(steps))]
            a.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
        sweep = sorted((r["lr"], r["val_loss"]) for r in arm["sweep"])
        b.plot([x for x, _ in sweep], [y for _, y in sweep], "o-", label=name)
    a.axhline(target, color="gray", ls=":", lw=1, label="target")
    a.set_xlabel("step")
    a.set_ylabel("validation loss (nats/char)")
    a.set_title("best lr, mean over seeds (band: min-max)")
    finals = [r["val_loss"] for arm in results.values() for r in arm["seeds"]]
    a.set_ylim(min(finals) - 0.05, min(finals) + 1.2)
    a.legend(fontsize=8)
    b.set_xscale("log")
    b.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labels would overlap
    b.set_xlabel("peak learning rate (matrices; all parameters for AdamW)")
    b.set_ylabel("final validation loss, seed 0")
    b.set_title("learning-rate sweeps")
    b.set_ylim(min(finals) - 0.05, min(finals) + 1.2)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
