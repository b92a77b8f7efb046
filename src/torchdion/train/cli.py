"""``torchdion-train``: train a character-level GPT on Shakespeare, data parallel."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path

import torch.distributed as dist

from . import ckpt, launch, optim, report
from .loop import PARALLEL, TrainConfig, check_config, train


def parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="torchdion-train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a small GPT on Shakespeare's plays (characters) with Dion or a "
        "baseline, on --nproc local workers or under torchrun.")
    a = p.add_argument
    a("--nproc", type=int, default=d.nproc, help="workers to start (ignored under torchrun)")
    a("--max-restarts", type=int, default=0,
      help="when a worker dies, stop the others and start all again from the newest checkpoint, "
      "up to this many times (with --nproc 1 the worker runs in a child process; under "
      "torchrun use its own --max-restarts)")
    a("--parallel", choices=PARALLEL, default=d.parallel)
    a("--optimizer", choices=optim.OPTIMIZERS, default=d.optimizer)
    a("--rank-fraction", type=float, default=d.rank_fraction,
      help="Dion rank / min(m, n); for PowerSGD, its rank is this times --d-model")
    a("--lr", type=float, default=None, help=f"matrix learning rate; default {optim.DEFAULT_LR}")
    a("--adam-lr", type=float, default=d.adam_lr,
      help="AdamW lr of embeddings, head, norms under dion and muon")
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--warmup", type=int, default=d.warmup, help="linear warmup steps")
    a("--decay", choices=("cosine", "linear", "none"), default=d.decay)
    a("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr / peak lr")
    a("--batch", type=int, default=d.batch, help="global batch (sequences per step)")
    a("--seq-len", type=int, default=d.seq_len)
    a("--steps", type=int, default=d.steps)
    a("--seed", type=int, default=d.seed)
    a("--n-layer", type=int, default=d.n_layer)
    a("--n-head", type=int, default=d.n_head)
    a("--d-model", type=int, default=d.d_model)
    a("--eval-interval", type=int, default=d.eval_interval)
    a("--eval-batches", type=int, default=d.eval_batches)
    a("--ckpt-interval", type=int, default=d.ckpt_interval, help="steps; 0 = no checkpoints")
    a("--keep-ckpts", type=int, default=d.keep_ckpts)
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    a("--stop-after", type=int, default=d.stop_after,
      help="stop after this many steps, keeping the schedule of --steps (0: run to --steps)")
    a("--out", default=d.out, help="run directory: metrics, plots, checkpoints")
    a("--dion-sync", choices=("compressed", "ddp"), default=d.dion_sync,
      help="compressed: Dion syncs replicas itself with low-rank factors; ddp: full "
      "gradient all-reduce by DDP")
    a("--sample-chars", type=int, default=d.sample_chars)
    a("--threads", type=int, default=d.threads, help="torch threads per worker; 0 = cores/nproc")
    a("--no-progress", dest="progress", action="store_false")
    a("--no-plots", dest="plots", action="store_false")
    return p


def config_from_args(argv=None) -> TrainConfig:
    ns = vars(parser().parse_args(argv))
    return TrainConfig(**{f.name: ns[f.name] for f in fields(TrainConfig)})


def _job(rank: int, world: int, device, cfg: TrainConfig, started: float) -> None:
    # A restarted job runs the first attempt's command line: it resumes from the newest whole
    # checkpoint, or starts over if the first attempt died before writing one.
    if launch.restart_count():
        with warnings.catch_warnings():  # train() warns about an unfinished save itself
            warnings.simplefilter("ignore")
            if ckpt.latest(Path(cfg.out) / "checkpoints") is not None:
                cfg = replace(cfg, resume=True)
        # Every rank must see the same answer: a fresh start's rank 0 deletes the directory.
        if dist.is_initialized():
            dist.barrier()
    s = train(cfg, rank, world, device)
    model, data = s.pop("model"), s.pop("data")
    text = ""
    # A sharded model's forward is collective: every rank generates (the same) sample.
    if cfg.sample_chars and (rank == 0 or cfg.parallel != "ddp"):
        text = report.sample(model, data, cfg.sample_chars, seed=cfg.seed)
    if rank != 0:
        return
    out = Path(cfg.out)
    if cfg.plots:
        report.plot_run(report.read_metrics(out / "metrics.jsonl"), out / "loss.png",
                        title=f"{cfg.optimizer}, rank fraction {cfg.rank_fraction}, {world} proc")
    s["wall_time"] = time.time() - started
    table = report.markdown_table(
        report.summary_rows(s) + [("wall time (s, whole command)", f"{s['wall_time']:.1f}")])
    (out / "summary.json").write_text(json.dumps(s, indent=1))
    (out / "summary.md").write_text(table)
    (out / "sample.txt").write_text(text)
    print("\n" + table)
    print(f"validation loss {s['val_loss']:.4f} vs unigram baseline {s['unigram_loss']:.4f} "
          "nats/char")
    if text:
        print("\nSample:\n" + text)
    files = ", ".join(str(out / f) for f in ("metrics.jsonl", "summary.md", "loss.png")
                      if (out / f).exists())
    print(f"\nwrote {files}")
    sys.stdout.flush()


def main(argv=None) -> None:
    started = time.time()
    cfg = config_from_args(argv)
    world = int(os.environ["WORLD_SIZE"]) if launch.under_torchrun() else cfg.nproc
    try:
        check_config(cfg, world)
    except (ValueError, NotImplementedError) as e:
        raise SystemExit(f"torchdion-train: {e}") from None
    max_restarts = parser().parse_args(argv).max_restarts
    launch.run(_job, cfg.nproc, cfg.threads, args=(cfg, started), max_restarts=max_restarts)


if __name__ == "__main__":
    main()
