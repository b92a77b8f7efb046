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
    Dion variant   Dion compressed's step   + k (variant - Dion), same rank (same bytes)

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

RESULTS = Path(__file__).resolve().parent / "results"
LINKS = {"1 Gbit/s": 4, "100 Mbit/s": 5}  # column of netem's step table
UNSHAPED = 3


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--convergence", default=str(RESULTS / "convergence.json"))
    p.add_argument("--netem", default=str(RESULTS / "netem.md"))
    p.add_argument("--step-time", default=str(RESULTS / "step_time_options.md"))
    p.add_argument("--out", default=str(RESULTS / "time_to_target.md"))
    args = p.parse_args(argv)
    shown = {k: Path(v).name for k, v in vars(args).items()}  # file names, not this machine's paths
    conv = json.loads(Path(args.convergence).read_text())
    netem = table_rows(Path(args.netem).read_text(), "arm")
    st_rows = table_rows(Path(args.step_time).read_text(), "optimizer")
    st = {name: seconds(cells[1]) for name, cells in st_rows.items()}

    def netem_s(arm: str, col: int) -> float:
        return float(netem[arm][col])

    k = ((netem_s("DDP + Dion 1/4 (full gradient sync)", UNSHAPED)
          - netem_s("DDP + AdamW", UNSHAPED)) / (st["Dion rank 1/4"] - st["torch.optim.AdamW"]))

    def step_time(name: str, arm: dict, col: int) -> tuple[float, bool]:
        """(seconds per step on the link, predicted?)"""
        if arm["optimizer"] == "adamw":
            return netem_s("DDP + AdamW", col), False
        if arm["optimizer"] == "muon":
            extra = st["torch.optim.Muon (bf16 NS)"] - st["torch.optim.AdamW"]
            return netem_s("DDP + AdamW", col) + k * extra, True
        rf = arm["rank_fraction"]
        label = "1 (full)" if rf == 1 else f"1/{round(1 / rf)}"
        base = f"Dion rank {label}"
        options = arm.get("options") or {}
        variant = f"{base} {json.dumps(options)}" if options else base
        if variant not in st:  # options not timed by step_time.py
            return math.nan, True
        if rf == 1:
            extra = st[variant] - st["Dion rank 1/4"]
            return netem_s("DDP + Dion 1/4 (full gradient sync)", col) + k * extra, True
        row = f"Dion compressed, rank 1/{round(1 / rf)}"
        if row not in netem:
            return math.nan, True
        if not options:
            return netem_s(row, col), False
        return netem_s(row, col) + k * (st[variant] - st[base]), True

    lines = [
        "# Time to AdamW's final loss on a rate-limited link", "",
        f"Command: `python benchmarks/time_to_target.py`. Steps: {shown['convergence']} "
        f"(target {conv['target']:.3f}, AdamW's mean final validation loss at "
        f"{conv['config']['steps']} steps). Seconds per step: {shown['netem']} (4 ranks, "
        "2 GPT-2-small blocks) where measured; *predicted* (marked p) from the netem step of "
        "the arm sending the same bytes plus k x the optimizer-compute difference in "
        f"{shown['step_time']}, k = {k:.2f} (see the script's docstring).", "",
        "| arm | steps to target | " + " | ".join(f"s / step, {lk}" for lk in LINKS)
        + " | " + " | ".join(f"time to target, {lk}" for lk in LINKS) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in range(2 * len(LINKS))) + " |",
    ]
    for name, arm in conv["arms"].items():
        reached = [s for s in arm["steps_to_target"] if not math.isnan(s)]
        if not reached:
            continue
        steps = statistics.mean(reached)
        note = "" if len(reached) == len(arm["steps_to_target"]) else \
            f" ({len(reached)}/{len(arm['steps_to_target'])} seeds)"
        cells, times = [], []
        for col in LINKS.values():
            s, predicted = step_time(name, arm, col)
            if math.isnan(s):
                cells.append("-")
                times.append("-")
                continue
            mark = " p" if predicted else ""
            cells.append(f"{s:.3f}{mark}")
            times.append(f"{steps * s / 60:.1f} min{mark}")
        lines.append(f"| {name} | {steps:.0f}{note} | " + " | ".join(cells) + " | "
                     + " | ".join(times) + " |")
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
