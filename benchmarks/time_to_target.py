"""Wall-clock time to AdamW's final loss on a rate-limited link: which rank to choose.

    time to target = steps to target x seconds per step on the link

Steps to target: ``benchmarks/results/convergence.json`` (the small GPT, mean over the seeds
that reach AdamW's mean final loss within the run). Seconds per step: the 4-rank runs of
``benchmarks/netem.py`` on two GPT-2-small blocks (``benchmarks/results/netem.md``), measured for
AdamW and compressed Dion at ranks 1/4 and 1/16. Arms with no netem row are *predicted*: the
netem step of the arm that sends the same bytes, plus the difference in optimizer compute
measured by ``benchmarks/step_time.py --layers 2`` (the same 8 matrices) and scaled to netem's
4 ranks on 2 cores by the one pair that was measured both ways (DDP + Dion 1/4 against
DDP + AdamW):

    Muon           DDP + AdamW's step       + k (Muon - AdamW)
    Dion r=1       DDP + Dion 1/4's step    + k (Dion r=1 - Dion 1/4)   (at full rank compressed
                                                                          Dion sends the gradient)
    Dion variant   Dion compressed's step   + k (variant - Dion), same rank (same bytes:
                                                 netem's replicas-only layout shards no rows,
                                                 so the Nesterov lookahead adds no bytes there)

netem.py's Dion ran the paper's Dion (``nesterov=False, lr_scale="spectral"``, the defaults of
its day), as step_time.py's plain Dion rows do; the library's default adds the lookahead:

    python benchmarks/step_time.py --layers 2 --repeats 3 --no-bf16 --no-fp32-muon \
        --dion-options '{"nesterov": true}' --out benchmarks/results/step_time_options.md

The two models differ (the steps are the small GPT's, the seconds GPT-2 blocks'): the table
ranks the optimizers for a model whose step costs what netem's does; it is not a measured run.

    python benchmarks/time_to_target.py     # reads the three results files, writes
                                            # benchmarks/results/time_to_target.md
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path

from torchdion.validation import fill_algorithm_defaults

RESULTS = Path(__file__).resolve().parent / "results"
LINKS = {"1 Gbit/s": 4, "100 Mbit/s": 5}  # column of netem's step table
UNSHAPED = 3
# What netem.py's Dion arms ran: the defaults of their day (benchmarks/convergence.py's PLAIN)
NETEM_DION = {"nesterov": False, "lr_scale": "spectral"}
RANKS = {"1": 1.0, "1/4": 0.25, "1/16": 0.0625}


def table_rows(md: str, first_cell: str) -> dict[str, list[str]]:
    """The markdown table whose header starts with ``first_cell``: {first cell: cells}."""
    rows, inside = {}, False
    for line in md.splitlines():
        if line.startswith(f"| {first_cell} |"):
            inside = True
            continue
        if inside and not line.startswith("|"):
            break
        if inside and not line.startswith("|-") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def seconds(cell: str) -> float:
    value = float(re.match(r"[\d.]+", cell).group())
    return value / 1e3 if "ms" in cell else value


def resolved(options: dict) -> dict:
    """Dion's options with the library's defaults filled in."""
    return fill_algorithm_defaults({"algorithm": "dion", "nesterov": None, "lr_scale": None,
                                    "polar_q": False, "direction_tol": 0.0, **options})


def step_time_row(rf: float, options: dict) -> str:
    """The row of ``benchmarks/step_time.py`` that timed Dion's compute at rank fraction ``rf``
    with ``options``: its plain rows step the paper's Dion, and ``--dion-options`` adds rows
    named by that JSON. Only the options that change the compute name a row (the scale does
    not)."""
    base = "Dion rank " + ("1 (full)" if rf == 1 else f"1/{round(1 / rf)}")
    full = resolved(options)
    extra = {k: True for k in ("nesterov", "polar_q") if full[k]}
    return f"{base} {json.dumps(extra)}" if extra else base


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--convergence", default=str(RESULTS / "convergence.json"))
    p.add_argument("--netem", default=str(RESULTS / "netem.md"))
    p.add_argument("--step-time", default=str(RESULTS / "step_time_options.md"))
    p.add_argument("--variant", default="nesterov+muon scale",
                   help="the convergence arms 'Dion r=<rank> <variant>' shown beside Dion's")
    p.add_argument("--out", default=str(RESULTS / "time_to_target.md"))
    args = p.parse_args(argv)
    shown = {k: Path(v).name for k, v in vars(args).items()}  # file names, not this machine's paths
    conv = json.loads(Path(args.convergence).read_text())
    netem = table_rows(Path(args.netem).read_text(), "arm")
    st_rows = table_rows(Path(args.step_time).read_text(), "optimizer")
    st = {name: seconds(cells[1]) for name, cells in st_rows.items()}

    def netem_s(arm: str, col: int) -> float:
        return float(netem[arm][col])

    def compute(rf: float, options: dict) -> float:
        return st.get(step_time_row(rf, options), math.nan)

    k = ((netem_s("DDP + Dion 1/4 (full gradient sync)", UNSHAPED)
          - netem_s("DDP + AdamW", UNSHAPED))
         / (compute(0.25, NETEM_DION) - st["torch.optim.AdamW"]))

    def step_time(arm: dict, col: int) -> tuple[float, bool]:
        """(seconds per step on the link, predicted?)"""
        if arm["optimizer"] == "adamw":
            return netem_s("DDP + AdamW", col), False
        if arm["optimizer"] == "muon":
            extra = st["torch.optim.Muon (bf16 NS)"] - st["torch.optim.AdamW"]
            return netem_s("DDP + AdamW", col) + k * extra, True
        rf, options = arm["rank_fraction"], arm.get("options") or {}
        if rf == 1:  # compressed Dion sends the gradient at full rank: DDP's bytes
            extra = compute(1.0, options) - compute(0.25, NETEM_DION)
            return netem_s("DDP + Dion 1/4 (full gradient sync)", col) + k * extra, True
        row = f"Dion compressed, rank 1/{round(1 / rf)}"
        if row not in netem:
            return math.nan, True
        if resolved(options) == resolved(NETEM_DION):
            return netem_s(row, col), False
        # the same bytes (the options change no DP-only sum), the options' compute on top
        return netem_s(row, col) + k * (compute(rf, options) - compute(rf, NETEM_DION)), True

    names = ["AdamW", "Muon"] + [f"Dion r={r}" for r in RANKS] + [
        f"Dion r={r} {args.variant}" for r in RANKS]
    lines = [
        "# Time to AdamW's final loss on a rate-limited link", "",
        f"Command: `python benchmarks/time_to_target.py`. Steps: {shown['convergence']} "
        f"(target {conv['target']:.3f}, AdamW's mean final validation loss at "
        f"{conv['config']['steps']} steps; mean over the seeds that reach it). Seconds per step: "
        f"{shown['netem']} (4 ranks, 2 GPT-2-small blocks) where measured; *predicted* (marked "
        "p) from the netem step of the arm sending the same bytes plus k x the "
        f"optimizer-compute difference in {shown['step_time']}, k = {k:.2f} (see the script's "
        "docstring). 'Dion r=...' is the paper's Dion (nesterov=False, spectral scale), what "
        f"netem measured; 'Dion r=... {args.variant}' adds the options.", "",
        "| arm | steps to target | " + " | ".join(f"s / step, {lk}" for lk in LINKS)
        + " | " + " | ".join(f"time to target, {lk}" for lk in LINKS) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in range(2 * len(LINKS))) + " |",
    ]
    for name in names:
        arm = conv["arms"].get(name)
        if arm is None:
            continue
        reached = [s for s in arm["steps_to_target"] if not math.isnan(s)]
        cells, times = [], []
        steps = statistics.mean(reached) if reached else math.nan
        for col in LINKS.values():
            s, predicted = step_time(arm, col)
            mark = " p" if predicted else ""
            cells.append("-" if math.isnan(s) else f"{s:.3f}{mark}")
            times.append("-" if math.isnan(s) or not reached else
                         f"{steps * s / 60:.1f} min{mark}")
        seen = f"{len(reached)}/{len(arm['steps_to_target'])} seeds"
        steps_cell = (f"not reached in {conv['config']['steps']} ({seen})" if not reached else
                      f"{steps:.0f}" + ("" if len(reached) == len(arm["steps_to_target"])
                                        else f" ({seen})"))
        lines.append(f"| {name} | {steps_cell} | " + " | ".join(cells) + " | "
                     + " | ".join(times) + " |")
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
