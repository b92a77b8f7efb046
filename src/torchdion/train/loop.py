"""The training loop, for one process or one rank of a parallel job: a :class:`Run` is built
from the settings (model, layout, optimizers, resumed state) and then stepped to the end."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from . import ckpt, launch, layouts, optim
from .config import RUN_FILES, TrainConfig, check
from .data import batch_windows, load_data
from .model import GPT, GPTConfig

EVAL_SEED = 12345  # validation windows are the same for every run, so losses compare


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The learning rate of step ``step`` (0-based) over the peak: linear warmup to 1 over
    ``warmup`` steps, then ``decay`` (cosine, linear, none) to ``min_lr_ratio`` at the last."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.decay == "none":
        return 1.0
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    shape = 0.5 * (1 + math.cos(math.pi * t)) if cfg.decay == "cosine" else 1 - t
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def _test_kill(step: int, rank: int, where: str) -> None:
    """Test hook: SIGKILL this worker at step TORCHDION_TEST_KILL_AT_STEP on rank
    TORCHDION_TEST_KILL_RANK (default 1), ``where`` TORCHDION_TEST_KILL_IN says ("step": after the
    step's update, "save": in that step's checkpoint save, after the files and before meta.json).
    Only in a job's first attempt, so the restarted one runs through."""
    at = os.environ.get("TORCHDION_TEST_KILL_AT_STEP")
    if (at is None or int(at) != step or launch.restart_count()
            or rank != int(os.environ.get("TORCHDION_TEST_KILL_RANK", "1"))
            or where != os.environ.get("TORCHDION_TEST_KILL_IN", "step")):
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _read_records(path: Path, upto: int) -> list[dict]:
    """The run's metrics up to step ``upto``. A worker killed while another was writing can
    leave the last line cut short: reading stops there."""
    records = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            break
        if r["step"] <= upto:
            records.append(r)
    return records


def _all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@dataclass
class Totals:
    """Running totals since the run's first step; saved in checkpoints, so a resumed run
    continues them."""

    tokens: int = 0
    train_time: float = 0.0  # seconds in training steps, without evaluation and saves
    bytes: int = 0  # sent by this process for the optimizer (see optim.Setup.step_bytes)
    full_bytes: int = 0  # what a full-gradient all-reduce would have sent


class Run:
    """One process's share of a training run. ``Run(cfg, rank, world, device).train()`` returns
    the summary; needs the process group when world > 1."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, world: int = 1, device="cpu") -> None:
        check(cfg, world)
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, torch.device(device)
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        if rank == 0:
            self._start_directory()
        self.data = load_data()
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = GPT(GPTConfig(vocab_size=self.data.vocab_size, seq_len=cfg.seq_len,
                                   n_layer=cfg.n_layer, n_head=cfg.n_head,
                                   d_model=cfg.d_model, n_expert=cfg.moe)).to(self.device)
        replicate, self.data_rank, self.data_world = layouts.apply(
            self.model, cfg, rank, world, self.device)
        self.setup = optim.build(
            cfg.optimizer, self.model, self.model.head, lr=cfg.resolved_lr(),
            adam_lr=cfg.adam_lr, weight_decay=cfg.weight_decay, rank_fraction=cfg.rank_fraction,
            seed=cfg.seed, world=world, dion_sync=cfg.dion_sync, parallel=cfg.parallel,
            replicate=replicate, dion_options=cfg.dion_options,
            matmul_dtype=cfg.matmul_dtype)
        self.net = self._wrap_ddp()
        # Peak learning rates from the settings, not from a checkpoint's (scheduled) groups.
        peaks = [[g["lr"] for g in o.param_groups] for o in self.setup.optimizers]
        self.totals, self.start, records = Totals(), 0, []
        if cfg.resume:
            records = self._resume()
        # The schedule is a function of the step: a resumed run picks it up at its step.
        for o, lrs in zip(self.setup.optimizers, peaks):
            for g, lr in zip(o.param_groups, lrs):
                g["initial_lr"] = lr
        self.schedulers = [LambdaLR(o, functools.partial(lr_factor, cfg), last_epoch=self.start - 1)
                           for o in self.setup.optimizers]
        self.metrics = None
        if rank == 0:  # what the interrupted run logged after its checkpoint is dropped
            path = self.out / "metrics.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
            self.metrics = path.open("a")

    def _start_directory(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.cfg.resume:
            return
        # A fresh run replaces what a previous one left (the command line refuses to unless
        # --overwrite); first thing, so that a job restarted after a crash finds no other run's
        # checkpoints to take for its own.
        for name in RUN_FILES:
            p = self.out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def _wrap_ddp(self):
        if not self.setup.sync.uses_ddp:
            return self.model
        kwargs = {}
        powersgd = self.setup.sync == optim.SyncMode.DDP_POWERSGD
        if powersgd and dist.get_backend() == "gloo":
            # powerSGD_hook issues its all-reduces from the callbacks of the previous ones; gloo
            # runs those on its own threads, so with several buckets the ranks can issue them in
            # different orders, mismatch, and abort (SIGABRT). One bucket leaves one order.
            # Setting bucket_cap_mb also sets DDP's small first bucket to the same cap.
            kwargs["bucket_cap_mb"] = sum(p.numel() * p.element_size()
                                          for p in self.model.parameters()) / 2**20 + 1
        cuda = self.device.type == "cuda"
        net = torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if cuda else None, **kwargs)
        if powersgd:
            optim.register_powersgd(self.setup, net, list(self.model.parameters()),
                                    self.cfg.rank_fraction, self.cfg.d_model)
        return net

    def _resume(self) -> list[dict]:
        """Load the newest whole checkpoint; returns the metrics logged up to it (rank 0)."""
        path = ckpt.latest(self.ckpt_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.ckpt_dir}")
        written_by = ckpt.read_meta(path)["world"]
        if written_by != self.world:  # per-process extras and the batch split assume it
            raise ValueError(f"{path} was written by {written_by} processes, not {self.world}")
        meta, extra = ckpt.load(path, self.net, self.setup.optimizers)
        if self.rank == 0:
            print(f"torchdion-train: resuming from {path}", flush=True)
        self.start = meta["step"]
        self.totals = Totals(tokens=meta["tokens"], train_time=meta["train_time"],
                             bytes=meta["bytes"], full_bytes=meta["full_bytes"])
        if extra is not None and self.setup.powersgd is not None:
            self.setup.powersgd.__setstate__(extra["powersgd"])
        metrics = self.out / "metrics.jsonl"
        return _read_records(metrics, self.start) if self.rank == 0 and metrics.is_file() else []

    @property
    def end(self) -> int:
        """The step this invocation stops after: --steps, or --stop-after if sooner."""
        stop = self.cfg.stop_after or self.cfg.steps
        return max(self.start, min(self.cfg.steps, stop))

    def _log(self, **record) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def _batch(self, split: torch.Tensor, seed: int, step: int):
        x, y = batch_windows(split, self.cfg.batch, self.cfg.seq_len, seed, step)
        per = self.cfg.batch // self.data_world
        rows = slice(self.data_rank * per, (self.data_rank + 1) * per)
        return x[rows].to(self.device), y[rows].to(self.device)

    def step(self, step: int) -> tuple[float, float]:
        """Train step ``step`` (0-based); returns (the loss averaged over processes, seconds)."""
        t0 = time.perf_counter()
        loss = self.net(*self._batch(self.data.train, self.cfg.seed, step))
        for o in self.setup.optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in self.setup.optimizers:
            o.step()
        dt = time.perf_counter() - t0
        t = self.totals
        t.train_time += dt
        t.tokens += self.cfg.batch * self.cfg.seq_len
        t.bytes += self.setup.step_bytes()
        t.full_bytes += self.setup.full_bytes if self.world > 1 else 0
        (loss_mean,) = _all_sum([loss.item() / self.world], self.device)  # tp: equal losses
        if not math.isfinite(loss_mean):
            raise FloatingPointError(f"training loss is {loss_mean} at step {step + 1}")
        return loss_mean, dt

    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation loss on the same ``eval_batches`` batches for every run."""
        self.net.eval()
        total, count = 0.0, 0.0
        for i in range(self.cfg.eval_batches):
            x, y = self._batch(self.data.val, EVAL_SEED, i)
            total += float(self.net(x, y)) * y.numel()
            count += y.numel()
        self.net.train()
        total, count = _all_sum([total, count], self.device)  # tp: every rank adds one batch
        return total / count

    def save(self, done: int) -> None:
        meta = dict(world=self.world, **asdict(self.totals), config=asdict(self.cfg))
        setup = self.setup
        extra = {"powersgd": setup.powersgd.__getstate__()} if setup.powersgd else None
        ckpt.save(self.ckpt_dir, done, self.net, setup.optimizers, meta, extra,
                  before_meta=functools.partial(_test_kill, done, self.rank, "save"))
        ckpt.prune(self.ckpt_dir, self.cfg.keep_ckpts)

    def train(self) -> dict:
        """Train from the start (or the resumed step) to ``end``; returns the summary."""
        cfg, bar = self.cfg, None
        if self.rank == 0 and cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.start, desc=cfg.optimizer,
                       dynamic_ncols=True)
        val_loss, evaluated_at = float("nan"), None
        for step in range(self.start, self.end):
            lr = self.setup.optimizers[0].param_groups[0]["lr"]
            loss, dt = self.step(step)
            for s in self.schedulers:
                s.step()
            done = step + 1
            _test_kill(done, self.rank, "step")
            t = self.totals
            self._log(kind="train", step=done, loss=loss, lr=lr, tokens=t.tokens,
                      time=t.train_time, bytes=t.bytes, full_bytes=t.full_bytes)
            if done % cfg.eval_interval == 0 or done == cfg.steps:
                val_loss, evaluated_at = self.evaluate(), done
                self._log(kind="eval", step=done, val_loss=val_loss, tokens=t.tokens,
                          time=t.train_time, bytes=t.bytes, full_bytes=t.full_bytes)
                if bar is not None:
                    bar.write(f"step {done}: val loss {val_loss:.4f}")
            if cfg.ckpt_interval and done % cfg.ckpt_interval == 0:
                self.save(done)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}",
                                tok_s=f"{cfg.batch * cfg.seq_len / dt:.0f}")
                bar.update(1)
        if bar is not None:
            bar.close()
        if evaluated_at != self.end:  # stopped between evaluations, or nothing to train
            val_loss = self.evaluate()
        if self.metrics is not None:
            self.metrics.close()
        return self.summary(val_loss)

    def summary(self, val_loss: float) -> dict:
        """What the run did, with the settings it did it with (JSON-ready but for model and
        data, which the caller pops)."""
        cfg, t = self.cfg, self.totals
        return dict(
            optimizer=cfg.optimizer, sync=self.setup.sync.value, parallel=cfg.parallel,
            world=self.world, lr=cfg.resolved_lr(), adam_lr=cfg.adam_lr,
            rank_fraction=cfg.rank_fraction, seed=cfg.seed, params=self.model.num_params(),
            steps_done=self.end, steps_planned=cfg.steps, val_loss=val_loss,
            unigram_loss=self.data.unigram_loss(),
            tokens_per_s=t.tokens / t.train_time if t.train_time else None,
            train_time=t.train_time, bytes=t.bytes, full_bytes=t.full_bytes,
            config=asdict(cfg), model=self.model, data=self.data)


def train(cfg: TrainConfig, rank: int = 0, world: int = 1, device="cpu") -> dict:
    """Train; returns the run's summary (on every rank). Needs the process group when world > 1."""
    return Run(cfg, rank, world, device).train()

