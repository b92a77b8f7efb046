"""The end of a run: summary table and files, plots of loss against steps and bytes, a sample."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import TORCHDION
from .optim import SyncMode

# Who sends the bytes the trainer counts, by sync mode (optim.Setup.step_bytes counts them).
SENDER = {
    SyncMode.NONE: "nothing (one process)",
    SyncMode.DDP: "DDP's gradient all-reduce",
    SyncMode.DDP_POWERSGD: "DDP's PowerSGD hook",
    SyncMode.DION_COMPRESSED: "Dion's low-rank replica sync",
    SyncMode.FSDP: "the optimizer (FSDP2's own not counted)",
    SyncMode.HSDP: "the optimizer (FSDP2's own not counted)",
    SyncMode.TP: "the optimizer (TP's activations not counted)",
    SyncMode.FSDP_TP: "the optimizer (FSDP2's and TP's own not counted)",
    SyncMode.EP: "the optimizer (FSDP2's and the token exchange not counted)",
}


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def summary_rows(s: dict) -> list[tuple[str, str]]:
    """The summary table: the settings that shaped the run, then what it did."""
    matrices = s["optimizer"] in (*TORCHDION, "muon")
    lr = (f"{s['lr']:g} (hidden matrices), {s['adam_lr']:g} (embeddings, head, norms)"
          if matrices else f"{s['lr']:g}")
    procs = f"{s['world']} process" + ("es" if s["world"] > 1 else "")
    steps = f"{s['steps_done']} of {s['steps_planned']}"
    if s["steps_done"] < s["steps_planned"]:
        steps += " (stopped early; --resume continues)"
    rows = [("optimizer", s["optimizer"]), ("learning rate (peak)", lr)]
    if s["optimizer"] in ("dion", "dion2", "adamw-powersgd"):
        rows.append(("rank fraction", f"{s['rank_fraction']:g}"))
    rows += [
        ("layout", f"{s['parallel']}, {procs}, sync: {s['sync']}"),
        ("seed", str(s["seed"])),
        ("parameters", f"{s['params']:,}"),
        ("steps", steps),
        ("validation loss (nats/char)", f"{s['val_loss']:.4f}"),
        ("unigram baseline (nats/char)", f"{s['unigram_loss']:.4f}"),
        ("tokens/s", "-" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:,.0f}"),
        ("training time (s, without eval)", f"{s['train_time']:.1f}"),
    ]
    if s["full_bytes"]:
        rows += [(f"MiB sent per process by {SENDER[SyncMode(s['sync'])]}", _mb(s["bytes"])),
                 ("a full-gradient all-reduce would send", _mb(s["full_bytes"])),
                 ("sent / full", f"{s['bytes'] / s['full_bytes']:.3f}")]
    return rows


def markdown_table(rows: list[tuple[str, str]]) -> str:
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def smooth(values: list[float], span: int | None = None) -> list[float]:
    """Centered moving average over ``2 span + 1`` points (fewer at the ends, kept symmetric),
    so the curve does not lag a trend the way a trailing average does. ``span`` defaults to
    len / 50: no smoothing under 50 points."""
    h = len(values) // 50 if span is None else span
    out = []
    for i in range(len(values)):
        k = min(h, i, len(values) - 1 - i)
        window = values[i - k:i + k + 1]
        out.append(sum(window) / len(window))
    return out


def figure(records: list[dict], sync: SyncMode, title: str = ""):
    """Two panels: loss against step, and validation loss against the cumulative bytes this
    process sent (with the same run placed at the bytes a full-gradient all-reduce needs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
    a.plot(steps, losses, color="C0", alpha=0.3, lw=0.8, label="train")
    if len(train) >= 50:
        a.plot(steps, smooth(losses), color="C0",
               label=f"train, mean of {2 * (len(train) // 50) + 1} steps")
    a.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="C1",
           label="validation")
    a.set_xlabel("step")
    a.set_ylabel("loss (nats/char)")
    a.legend()
    if evals and evals[-1]["full_bytes"]:
        mib = 2**20
        b.plot([r["bytes"] / mib for r in evals], [r["val_loss"] for r in evals], "o-",
               label=f"sent by {SENDER[sync]}")
        b.plot([r["full_bytes"] / mib for r in evals], [r["val_loss"] for r in evals], "x--",
               label="a full-gradient all-reduce, same steps")
        b.set_xlabel("MiB sent per process (cumulative)")
        b.legend()
    else:
        b.text(0.5, 0.5, "one process: nothing communicated", ha="center", va="center")
    b.set_ylabel("validation loss (nats/char)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_run(records: list[dict], out_png: Path, sync: SyncMode, title: str = "") -> None:
    import matplotlib.pyplot as plt

    fig = figure(records, sync, title)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def sample(model, data, n: int, prompt: str = "ROMEO:\n", seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    idx = data.encode(prompt)[None].to(device)
    was_training = model.training
    model.eval()
    ids = model.generate(idx, n, generator=g if device.type == "cpu" else None)
    model.train(was_training)
    return data.decode(ids[0].tolist())


def finish(out: Path, s: dict, text: str, plots: bool, wall_time: float,
           continue_with: str | None) -> None:
    """Write the summary, plot and sample into ``out`` and print what a user needs: the
    table, the loss against the baseline, the sample, how to continue an unfinished run and
    every file written."""
    out = Path(out)
    if plots:
        title = (f"{s['optimizer']}, rank fraction {s['rank_fraction']:g}, "
                 f"{s['parallel']} on {s['world']} process" + ("es" if s["world"] > 1 else ""))
        plot_run(read_metrics(out / "metrics.jsonl"), out / "loss.png", SyncMode(s["sync"]),
                 title)
    s = {**s, "wall_time": wall_time}
    table = markdown_table(summary_rows(s) + [("wall time (s, whole command)",
                                               f"{wall_time:.1f}")])
    (out / "summary.json").write_text(json.dumps(s, indent=1))
    (out / "summary.md").write_text(table)
    if text:
        (out / "sample.txt").write_text(text)
    print("\n" + table)
    print(f"validation loss {s['val_loss']:.4f} vs unigram baseline {s['unigram_loss']:.4f} "
          "nats/char")
    if text:
        print("\nSample:\n" + text)
    if continue_with:
        print(f"\nstopped after step {s['steps_done']} of {s['steps_planned']}; "
              f"continue with:\n  {continue_with}")
    names = ("metrics.jsonl", "summary.md", "summary.json", "loss.png", "sample.txt")
    written = [str(out / f) for f in names if (out / f).exists()]
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    if ckpts:
        written.append(f"{out / 'checkpoints'}/ ({', '.join(p.name for p in ckpts)})")
    print("\nwrote " + ", ".join(written), flush=True)
