"""``torchdion-train``: train a character-level GPT on Shakespeare, data parallel.

The settings are checked as a whole before any worker starts (``config.check``, ``check_out``):
a bad one ends the command with one line naming the option and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path

import torch.distributed as dist

from . import ckpt, launch, report
from .config import (
    DECAYS,
    DEFAULT_LR,
    DION_SYNCS,
    MATMUL_DTYPES,
    OPTIMIZERS,
    PARALLEL,
    TrainConfig,
    check,
    check_out,
    option,
)
from .loop import Run


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" not in text and action.default is not argparse.SUPPRESS:
            text += " (default: %(default)s)"
        return text


def parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="torchdion-train", formatter_class=_HelpFormatter,
        description="Train a small GPT on Shakespeare's plays (characters) with Dion or a "
        "baseline, on --nproc local workers or under torchrun.")
    lrs = ", ".join(f"{v:g} for {k}" for k, v in DEFAULT_LR.items())
    g = p.add_argument_group("processes")
    g.add_argument("--nproc", type=int, default=d.nproc,
                   help="workers to start on this machine (ignored under torchrun)")
    g.add_argument("--max-restarts", type=int, default=d.max_restarts,
                   help="when a worker dies, stop the others and start all again from the "
                   "newest checkpoint, up to this many times (with --nproc 1 the worker runs "
                   "in a child process; under torchrun use its own --max-restarts)")
    g.add_argument("--parallel", choices=PARALLEL, default=d.parallel,
                   help="layout: ddp replicates the model; fsdp shards it (FSDP2); hsdp "
                   "replicates 2 FSDP2 shard groups; tp splits matrices (Megatron); fsdp-tp "
                   "nests TP inside FSDP2; ep splits the experts of --moe over the processes "
                   "(expert parallelism) and shards the rest with FSDP2")
    g.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads per worker; 0 = cores / workers")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help="what updates the hidden matrices (see docs/trainer.md)")
    g.add_argument("--rank-fraction", type=float, default=d.rank_fraction,
                   help="Dion rank / min(m, n); for PowerSGD, its rank is this times --d-model")
    g.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate of the hidden matrices, of everything under adamw "
                   f"(default: {lrs})")
    g.add_argument("--adam-lr", type=float, default=d.adam_lr,
                   help="peak AdamW lr of embeddings, head and norms under dion and muon")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="decoupled weight decay (times the lr)")
    g.add_argument("--matmul-dtype", choices=MATMUL_DTYPES, default=d.matmul_dtype,
                   help="dtype of Dion's four big products (bf16: faster, within bf16 rounding)")
    g.add_argument("--dion-sync", choices=DION_SYNCS, default=d.dion_sync,
                   help="compressed: Dion syncs replicas itself with low-rank factors; ddp: DDP "
                   "all-reduces full gradients")
    g = p.add_argument_group("schedule")
    g.add_argument("--steps", type=int, default=d.steps, help="steps the schedule plans for")
    g.add_argument("--stop-after", type=int, default=d.stop_after,
                   help="stop after this many steps, keeping the schedule of --steps; continue "
                   "later with --resume (0: run to --steps)")
    g.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps")
    g.add_argument("--decay", choices=DECAYS, default=d.decay,
                   help="decay after warmup, down to --min-lr-ratio at the last step")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help="final lr / peak lr")
    g.add_argument("--batch", type=int, default=d.batch,
                   help="global batch in sequences per step, split over the data-parallel "
                   "processes")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="characters per sequence")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="initial weights, batches and Dion's sketches")
    g = p.add_argument_group("model")
    g.add_argument("--n-layer", type=int, default=d.n_layer, help="transformer blocks")
    g.add_argument("--n-head", type=int, default=d.n_head,
                   help="attention heads; must divide --d-model")
    g.add_argument("--d-model", type=int, default=d.d_model, help="width of the residual stream")
    g.add_argument("--moe", type=int, default=d.moe, metavar="E",
                   help="mixture of experts: each MLP becomes E experts of its width with top-2 "
                   "routing; Dion steps each expert as its own matrix (0: dense MLPs)")
    g = p.add_argument_group("evaluation and outputs")
    g.add_argument("--eval-interval", type=int, default=d.eval_interval,
                   help="steps between validation losses (and one at the last step)")
    g.add_argument("--eval-batches", type=int, default=d.eval_batches,
                   help="validation batches per evaluation")
    g.add_argument("--ckpt-interval", type=int, default=d.ckpt_interval,
                   help="steps between checkpoints; 0 = no checkpoints")
    g.add_argument("--keep-ckpts", type=int, default=d.keep_ckpts,
                   help="newest checkpoints to keep; 0 = all")
    g.add_argument("--out", default=d.out,
                   help="run directory: metrics, summary, plot, sample, checkpoints")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint (default: start "
                   "a new run)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in --out (default: refuse to)")
    g.add_argument("--sample-chars", type=int, default=d.sample_chars,
                   help="characters of text to generate at the end; 0 = none")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (default: show one)")
    g.add_argument("--no-plots", dest="plots", action="store_false",
                   help="no loss.png (default: write it)")
    for action in p._actions:  # short placeholders: "--steps N", not "--steps STEPS"
        if action.metavar is None and action.choices is None and action.nargs != 0:
            action.metavar = "N" if action.type is int else "X" if action.type is float \
                else "DIR"
    return p


def config_from_args(argv=None) -> TrainConfig:
    ns = vars(parser().parse_args(argv))
    return TrainConfig(**{f.name: ns[f.name] for f in fields(TrainConfig) if f.name in ns})


def command_line(cfg: TrainConfig) -> str:
    """A ``torchdion-train`` command with ``cfg``'s settings (only those off the default)."""
    default, args = TrainConfig(), []
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if value == getattr(default, f.name) or f.name == "dion_options":  # no such option
            continue
        if f.type == "bool":
            args.append(option(f.name) if value else "--no-" + f.name.replace("_", "-"))
        else:
            args += [option(f.name), str(value)]
    return shlex.join(["torchdion-train", *args])


def _job(rank: int, world: int, device, cfg: TrainConfig, started: float) -> None:
    # A restarted job runs the first attempt's command line: it resumes from the newest whole
    # checkpoint, or starts over if the first attempt died before writing one.
    if launch.restart_count():
        with warnings.catch_warnings():  # Run warns about an unfinished save itself
            warnings.simplefilter("ignore")
            if ckpt.latest(Path(cfg.out) / "checkpoints") is not None:
                cfg = replace(cfg, resume=True, overwrite=False)
        # Every rank must see the same answer: a fresh start's rank 0 deletes the directory.
        if dist.is_initialized():
            dist.barrier()
    s = Run(cfg, rank, world, device).train()
    model, data = s.pop("model"), s.pop("data")
    text = ""
    # A sharded model's forward is collective: every rank generates (the same) sample.
    if cfg.sample_chars and (rank == 0 or cfg.parallel != "ddp"):
        text = report.sample(model, data, cfg.sample_chars, seed=cfg.seed)
    if rank != 0:
        return
    unfinished = s["steps_done"] < s["steps_planned"]
    again = command_line(replace(cfg, stop_after=0, resume=True, overwrite=False))
    report.finish(Path(cfg.out), s, text, cfg.plots, time.time() - started,
                  continue_with=again if unfinished else None)


def main(argv=None) -> None:
    started = time.time()
    cfg = config_from_args(argv)
    world = int(os.environ["WORLD_SIZE"]) if launch.under_torchrun() else cfg.nproc
    try:
        check(cfg, world)
        # A restarted attempt (torchrun's) finds its own first attempt's files in --out.
        if not launch.restart_count():
            check_out(cfg, world)
    except (ValueError, NotImplementedError, ckpt.CheckpointError) as e:
        raise SystemExit(f"torchdion-train: {e}") from None
    try:
        launch.run(_job, cfg.nproc, cfg.threads, args=(cfg, started),
                   max_restarts=cfg.max_restarts)
    except launch.WorkerError as e:
        raise SystemExit(f"torchdion-train: {e}") from None
    sys.stdout.flush()


if __name__ == "__main__":
    main()
