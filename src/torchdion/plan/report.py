"""The planner's table and scaling plot."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .collectives import DionConfig
from .cost import Cluster
from .predict import Prediction, default_parallelism, fits, predict
from .shard import Parallelism, Param

SCALING_GPUS = tuple(8 * 2 ** i for i in range(12))  # 8 .. 16384
OPTIMIZERS_HEADER = ("model", "GPUs", "layout", "optimizer", "payload MB", "wire MB",
                     "colls", "comm ms", "GFLOP", "compute ms", "step ms", "state GB")


def optimizers(dion: Sequence[DionConfig]) -> list[str | DionConfig]:
    return ["adamw", "muon", *dion]


def rows_for(name: str, params: list[Param], gpus: int, cluster: Cluster,
             dion: Sequence[DionConfig], par: Parallelism | None = None
             ) -> list[tuple[str, int, Prediction]]:
    par = par or default_parallelism(params, gpus, cluster)
    extra = ["fsdp"] if par.fsdp > 1 else []
    return [(name, gpus, predict(params, par, cluster, opt)) for opt in optimizers(dion) + extra]


def table(rows: Sequence[tuple[str, int, Prediction]]) -> str:
    """A Markdown table, one row per (model, GPUs, optimizer); per rank and per step.
    A state column marked * does not fit in half of the GPU's memory."""
    lines = ["| " + " | ".join(OPTIMIZERS_HEADER) + " |",
             "|" + "|".join(" --- " for _ in OPTIMIZERS_HEADER) + "|"]
    for name, gpus, p in rows:
        cells = (name, str(gpus), str(p.par), p.optimizer, f"{p.payload_bytes / 1e6:,.1f}",
                 f"{p.wire_bytes / 1e6:,.1f}", str(p.collectives), f"{p.comm_time * 1e3:,.2f}",
                 f"{p.flops / 1e9:,.1f}", f"{p.compute_time * 1e3:,.2f}",
                 f"{p.time * 1e3:,.2f}", f"{p.state_bytes / 1e9:,.1f}" + ("" if p.fits else "*"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(models: dict[str, list[Param]], cluster: Cluster, dion: Sequence[DionConfig],
         path: str, gpus: Sequence[int] = SCALING_GPUS) -> None:
    """Communication time (ring, and with tree latency dashed) and optimizer step time per rank
    against GPUs, one column per model, with the default layouts; GPU counts whose training
    state does not fit are left out. Comm times of 0 (nothing to send) do not show on the log
    scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tree = dataclasses.replace(cluster, allreduce="tree")
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 8), squeeze=False)
    for col, (name, params) in enumerate(models.items()):
        fitting = [g for g in gpus
                   if fits(params, default_parallelism(params, g, cluster), cluster)]
        for row in (0, 1):
            ax = axes[row][col]
            for i, opt in enumerate(optimizers(dion)):
                preds = [predict(params, default_parallelism(params, g, cluster), cluster, opt)
                         for g in fitting]
                if not preds:
                    continue
                color = f"C{i}"
                if row == 0:
                    ax.plot(fitting, [p.comm_time * 1e3 for p in preds], "o-", color=color,
                            markersize=3, label=preds[0].optimizer)
                    ax.plot(fitting, [predict(params, p.par, tree, opt).comm_time * 1e3
                                      for p in preds], "--", color=color, linewidth=1)
                else:
                    ax.plot(fitting, [p.time * 1e3 for p in preds], "o-", color=color,
                            markersize=3, label=preds[0].optimizer)
            if row == 0 and any(default_parallelism(params, g, cluster).fsdp > 1
                                for g in fitting):
                fsdp = [predict(params, default_parallelism(params, g, cluster), cluster,
                                "fsdp").comm_time * 1e3 for g in fitting]
                ax.plot(fitting, [t or float("nan") for t in fsdp], ":", color="gray",
                        label="FSDP itself (any optimizer)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("GPUs")
            ax.set_ylabel("communication (ring), ms per step" if row == 0
                          else "communication + compute (ring), ms per step")
            ax.grid(True, which="both", alpha=0.3)
            if row == 0:
                ax.plot([], [], "k--", linewidth=1, label="dashed: tree latency")
            ax.legend(fontsize=7)
        if fitting:
            first, last = (default_parallelism(params, g, cluster)
                           for g in (fitting[0], fitting[-1]))
            axes[0][col].set_title(f"{name}\n{first} .. {last}", fontsize=10)
    fig.suptitle(f"Optimizer step per rank ({cluster.allreduce} all-reduce; "
                 f"{cluster.gpus_per_node} GPUs/node at {cluster.intra_bw / 1e9:g} GB/s, "
                 f"{cluster.inter_bw / 1e9:g} GB/s across; {cluster.flops / 1e12:g} TFLOP/s)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
