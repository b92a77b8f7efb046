"""torchdion-plan: predicted communication and compute of an optimizer step at scale."""

from __future__ import annotations

import argparse
import sys

from .collectives import DionConfig
from .cost import Cluster
from .model import PRESETS, GPTShape, params_from_shapes
from .report import SCALING_GPUS, plot, rows_for, table
from .shard import Parallelism


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.lower().split("x"))


def _layout(text: str) -> Parallelism:
    dp, fsdp, tp = _shape(text)
    return Parallelism(dp=dp, fsdp=fsdp, tp=tp)


def _gpt(text: str) -> GPTShape:
    d, layers, vocab, context, *ffn = (int(x) for x in text.split(","))
    return GPTShape("custom", d, layers, vocab, context, ffn=ffn[0] if ffn else 0)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="torchdion-plan", description=__doc__,
        epilog="Per rank 0 (the largest shards) and per step. FSDP's own parameter all-gathers "
               "and gradient reduce-scatter are the same for every optimizer: a row of their own.")
    what = ap.add_argument_group("model (default: the three presets)")
    what.add_argument("--model", action="append", choices=sorted(PRESETS), default=[])
    what.add_argument("--gpt", metavar="D,LAYERS,VOCAB,CONTEXT[,FFN]", type=_gpt,
                      help="a GPT-2-style model")
    what.add_argument("--shapes", metavar="MxN,...",
                      help="matrices (2-D) and element-wise tensors (other shapes), fp32")
    where = ap.add_argument_group("cluster and layout")
    where.add_argument("--gpus", type=int, nargs="+", default=[8, 512, 16384])
    where.add_argument("--layout", type=_layout, metavar="DPxFSDPxTP",
                       help="fixed layout (its product is the GPU count); default: TP over a "
                            "node above 20B parameters, the fewest FSDP ranks that hold the "
                            "state, DP for the rest")
    where.add_argument("--gpus-per-node", type=int, default=8)
    where.add_argument("--intra-bw", type=float, default=360, help="GB/s per GPU")
    where.add_argument("--inter-bw", type=float, default=50, help="GB/s per GPU")
    where.add_argument("--intra-lat", type=float, default=3, help="microseconds")
    where.add_argument("--inter-lat", type=float, default=10, help="microseconds")
    where.add_argument("--tflops", type=float, default=400, help="matmul rate, TFLOP/s")
    where.add_argument("--gpu-memory", type=float, default=80, help="GB")
    where.add_argument("--allreduce", choices=("ring", "tree"), default="ring")
    how = ap.add_argument_group("Dion")
    how.add_argument("--rank-fraction", type=float, nargs="+", default=[0.25, 1 / 16])
    how.add_argument("--rank-multiple-of", type=int, default=1)
    how.add_argument("--method", choices=("randomized", "cholesky", "qr"), default="randomized")
    how.add_argument("--dion2-fraction", type=float, nargs="*", default=[0.25],
                     help="Dion2 rows for these fractions (its replicas average whole gradients)")
    how.add_argument("--torchdion-muon", action="store_true",
                     help="also torchdion's Muon (Newton-Schulz over summed Grams, no gather)")
    ap.add_argument("--plot", metavar="PNG", help=f"also draw the scaling plot "
                    f"({SCALING_GPUS[0]} to {SCALING_GPUS[-1]} GPUs, default layouts)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cluster = Cluster(
        gpus_per_node=args.gpus_per_node, intra_bw=args.intra_bw * 1e9,
        inter_bw=args.inter_bw * 1e9, intra_lat=args.intra_lat * 1e-6,
        inter_lat=args.inter_lat * 1e-6, flops=args.tflops * 1e12,
        gpu_memory=args.gpu_memory * 1e9, allreduce=args.allreduce)
    dion = [DionConfig(f, args.rank_multiple_of, args.method) for f in args.rank_fraction]
    dion += [DionConfig(f, args.rank_multiple_of, algorithm="dion2") for f in args.dion2_fraction]
    if args.torchdion_muon:
        dion.append(DionConfig(1.0, algorithm="muon"))
    models = {name: PRESETS[name].params() for name in args.model}
    if args.gpt:
        models["custom GPT"] = args.gpt.params()
    if args.shapes:
        models["shapes"] = params_from_shapes(_shape(s) for s in args.shapes.split(","))
    if not models:
        models = {name: cfg.params() for name, cfg in PRESETS.items()}
    gpus = [args.layout.world] if args.layout else args.gpus
    rows = []
    for name, params in models.items():
        for g in gpus:
            rows += rows_for(name, params, g, cluster, dion, args.layout)
    print(table(rows))
    print("\nPer rank 0 and per optimizer step; payload: bytes handed to collectives; wire: "
          "sent with ring algorithms;\nstep = comm + compute without overlap; state * : "
          "over half of the GPU's memory. (FSDP itself): FSDP's parameter all-gathers\nand "
          "gradient reduce-scatter, paid with any optimizer and counted in no other row.\n"
          "Dion2 and torchdion's Muon have no compressed data-parallel sync: their replicas "
          "average the whole gradient.")
    if args.plot:
        plot(models, cluster, dion, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
