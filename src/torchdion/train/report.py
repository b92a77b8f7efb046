"""The end of a run: summary table, plots of loss against steps and bytes, a text sample."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def summary_rows(s: dict) -> list[tuple[str, str]]:
    ratio = s["bytes"] / s["full_bytes"] if s["full_bytes"] else float("nan")
    bytes_label = "bytes sent by the gradient sync, per process"
    if s["sync"] in ("fsdp", "hsdp", "tp", "fsdp-tp"):
        bytes_label = "bytes sent by the optimizer, per process (the layout's own not counted)"
    procs = f"{s['world']} process" + ("es" if s["world"] > 1 else "")
    return [
        ("optimizer", f"{s['optimizer']} (gradient sync: {s['sync']}, {procs})"),
        ("parameters", f"{s['params']:,}"),
        ("steps", str(s["steps"])),
        ("validation loss (nats/char)", f"{s['val_loss']:.4f}"),
        ("unigram baseline (nats/char)", f"{s['unigram_loss']:.4f}"),
        ("tokens/s", f"{s['tokens_per_s']:,.0f}"),
        ("training time (s, without eval)", f"{s['train_time']:.1f}"),
        (bytes_label, _mb(s["bytes"])),
        ("full-gradient all-reduce would send", _mb(s["full_bytes"])),
        ("sent / full", f"{ratio:.3f}"),
    ]


def markdown_table(rows: list[tuple[str, str]]) -> str:
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def _ema(values: list[float], beta: float = 0.9) -> list[float]:
    out, m = [], None
    for v in values:
        m = v if m is None else beta * m + (1 - beta) * v
        out.append(m)
    return out


def plot_run(records: list[dict], out_png: Path, title: str = "") -> None:
    """Two panels: loss vs step, and loss vs cumulative bytes sent by the gradient sync (with
    the same run placed at the bytes a full-gradient all-reduce would have needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([r["step"] for r in train], _ema([r["loss"] for r in train]), label="train (EMA)")
    a.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    a.set_xlabel("step")
    a.set_ylabel("loss (nats/char)")
    a.legend()
    if evals and evals[-1]["full_bytes"]:
        mib = 2**20
        b.plot([r["bytes"] / mib for r in evals], [r["val_loss"] for r in evals], "o-",
               label="bytes sent")
        b.plot([r["full_bytes"] / mib for r in evals], [r["val_loss"] for r in evals], "x--",
               label="full-gradient all-reduce, same steps")
        b.set_xlabel("MiB sent per process (cumulative)")
        b.legend()
    else:
        b.text(0.5, 0.5, "one process: nothing communicated", ha="center", va="center")
    b.set_ylabel("validation loss")
    fig.suptitle(title)
    fig.tight_layout()
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
