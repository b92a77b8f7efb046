"""The training loop, for one process or one rank of a data-parallel group."""

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

from ..parallel import fsdp_beside_tp
from . import ckpt, launch, optim
from .data import batch_windows, load_data
from .model import GPT, GPTConfig

PARALLEL = ("ddp", "fsdp", "tp", "fsdp-tp", "hsdp")
EVAL_SEED = 12345  # validation windows are the same for every run, so losses compare


@dataclass
class TrainConfig:
    optimizer: str = "dion"
    parallel: str = "ddp"
    nproc: int = 2
    rank_fraction: float = 0.25
    lr: float | None = None  # None: optim.DEFAULT_LR[optimizer]
    adam_lr: float = 3e-3  # element-wise parameters when the matrices use Dion or Muon
    weight_decay: float = 0.01
    warmup: int = 50
    decay: str = "cosine"  # cosine | linear | none
    min_lr_ratio: float = 0.1
    batch: int = 16  # global, split over the processes
    seq_len: int = 128
    steps: int = 600
    seed: int = 0
    n_layer: int = 6
    n_head: int = 6
    d_model: int = 192
    eval_interval: int = 100
    eval_batches: int = 16
    ckpt_interval: int = 200  # 0: no checkpoints
    keep_ckpts: int = 2
    resume: bool = False
    stop_after: int = 0  # stop once this many steps are done (0: at --steps); splits a run
    out: str = "runs/train"
    dion_sync: str = "compressed"  # compressed | ddp
    sample_chars: int = 300
    progress: bool = True
    plots: bool = True
    threads: int = 0  # 0: cores / processes

    def resolved_lr(self) -> float:
        return optim.DEFAULT_LR[self.optimizer] if self.lr is None else self.lr


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to 1, then ``decay`` to min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.decay == "none":
        return 1.0
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    shape = 0.5 * (1 + math.cos(math.pi * t)) if cfg.decay == "cosine" else 1 - t
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def check_config(cfg: TrainConfig, world: int = 1) -> None:
    if cfg.parallel not in PARALLEL:
        raise ValueError(f"--parallel must be one of {PARALLEL}, got {cfg.parallel!r}")
    tp = world if cfg.parallel == "tp" else world // 2 if cfg.parallel == "fsdp-tp" else 1
    if cfg.parallel == "fsdp-tp" and (world < 4 or world % 2):
        raise ValueError("--parallel fsdp-tp needs an even number of processes >= 4: FSDP over "
                         "2, TP over world/2")
    if cfg.n_head % tp:
        raise ValueError(f"--parallel {cfg.parallel} splits the {cfg.n_head} heads over {tp} "
                         "processes: --n-head must be a multiple of that")
    if cfg.parallel != "ddp" and cfg.optimizer not in ("dion", "adamw"):
        raise NotImplementedError(
            f"--parallel {cfg.parallel} runs --optimizer dion or adamw (torch.optim.Muon does not "
            "take sharded parameters; PowerSGD is a DDP hook)")
    if cfg.parallel != "ddp" and world == 1:
        raise ValueError(f"--parallel {cfg.parallel} needs at least 2 processes")
    if cfg.parallel == "hsdp" and (world < 4 or world % 2):
        raise ValueError("--parallel hsdp needs an even number of processes >= 4: 2 replicas "
                         "of world/2 shards")
    if cfg.decay not in ("cosine", "linear", "none"):
        raise ValueError(f"--decay must be cosine, linear or none, got {cfg.decay!r}")
    if cfg.optimizer not in optim.OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {optim.OPTIMIZERS}, got {cfg.optimizer!r}")
    if cfg.dion_sync not in ("compressed", "ddp"):
        raise ValueError(f"--dion-sync must be compressed or ddp, got {cfg.dion_sync!r}")
    if cfg.batch % world:
        raise ValueError(f"--batch {cfg.batch} must be divisible by the {world} processes")


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


@torch.no_grad()
def evaluate(model, data, cfg: TrainConfig, rank: int, world: int, device) -> float:
    model.eval()
    total, count = 0.0, 0
    per = cfg.batch // world
    for i in range(cfg.eval_batches):
        x, y = batch_windows(data.val, cfg.batch, cfg.seq_len, EVAL_SEED, i)
        x, y = x[rank * per:(rank + 1) * per].to(device), y[rank * per:(rank + 1) * per].to(device)
        total += float(model(x, y)) * y.numel()
        count += y.numel()
    model.train()
    total, count = _all_sum([total, count], device)  # tp: every rank adds the same batch
    return total / count


def shard(model, cfg: TrainConfig, world: int, device):
    """FSDP2 per block and at the root. hsdp: 2 replicas of world/2 shards; Dion syncs the
    replicas itself (returns that mesh dimension), AdamW lets FSDP2 do it on the 2-D mesh."""
    from torch.distributed.fsdp import fully_shard

    replicate = None
    if cfg.parallel == "fsdp":
        mesh = init_mesh(device, (world,))
    else:
        mesh = init_mesh(device, (2, world // 2), ("replicate", "shard"))
        if cfg.optimizer == "dion":
            mesh, replicate = mesh["shard"], mesh["replicate"]
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return replicate


def init_mesh(device, shape, names=None):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(torch.device(device).type, shape, mesh_dim_names=names)


def fsdp_tp(model, world: int, device) -> int:
    """TP over world/2 inside FSDP2 over 2; FSDP shards the matrix dim TP leaves whole.
    Returns this rank's data shard (its FSDP coordinate)."""
    from torch.distributed.fsdp import fully_shard

    mesh = init_mesh(device, (2, world // 2), ("dp", "tp"))
    tensor_parallel(model, mesh["tp"])

    for blk in model.blocks:
        fully_shard(blk, mesh=mesh["dp"], shard_placement_fn=fsdp_beside_tp)
    fully_shard(model, mesh=mesh["dp"], shard_placement_fn=fsdp_beside_tp)
    return mesh["dp"].get_local_rank()


def tensor_parallel(model, mesh) -> None:
    """Megatron-style: q, k, v and fc split by output (heads, hidden units), proj and out by
    input; embeddings, norms and head stay whole."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(),
            "attn.v": ColwiseParallel(), "attn.proj": RowwiseParallel(),
            "fc": ColwiseParallel(), "out": RowwiseParallel()}
    for blk in model.blocks:
        parallelize_module(blk, mesh, plan)


def train(cfg: TrainConfig, rank: int = 0, world: int = 1, device="cpu") -> dict:
    """Train; returns the run's summary (on every rank). Needs the process group when world > 1."""
    check_config(cfg, world)
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        # A fresh run must not resume into old ones; first thing, so that a job restarted after
        # a crash finds no other run's checkpoints to take for its own.
        if not cfg.resume and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
    data = load_data()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    mcfg = GPTConfig(vocab_size=data.vocab_size, seq_len=cfg.seq_len, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, d_model=cfg.d_model)
    model = GPT(mcfg).to(device)
    replicate, data_rank, data_world = None, rank, world
    if cfg.parallel in ("fsdp", "hsdp"):
        replicate = shard(model, cfg, world, device)
    elif cfg.parallel == "tp":  # tensor-parallel ranks share one batch
        tensor_parallel(model, init_mesh(device, (world,)))
        data_rank, data_world = 0, 1
    elif cfg.parallel == "fsdp-tp":
        data_rank = fsdp_tp(model, world, device)
        data_world = 2
    setup = optim.build(cfg.optimizer, model, model.head, lr=cfg.resolved_lr(),
                        adam_lr=cfg.adam_lr, weight_decay=cfg.weight_decay,
                        rank_fraction=cfg.rank_fraction, seed=cfg.seed, world=world,
                        dion_sync=cfg.dion_sync, parallel=cfg.parallel, replicate=replicate)
    net = model
    if setup.use_ddp:
        kwargs = {}
        if setup.sync == "ddp-powersgd" and dist.get_backend() == "gloo":
            # powerSGD_hook issues its all-reduces from the callbacks of the previous ones; gloo
            # runs those on its own threads, so with several buckets the ranks can issue them in
            # different orders, mismatch, and abort (SIGABRT). One bucket leaves one order.
            # Setting bucket_cap_mb also sets DDP's small first bucket to the same cap.
            kwargs["bucket_cap_mb"] = sum(p.numel() * p.element_size()
                                          for p in model.parameters()) / 2**20 + 1
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if getattr(device, "type", "cpu") == "cuda" else None,
            **kwargs)
        if setup.sync == "ddp-powersgd":
            optim.register_powersgd(setup, net, list(model.parameters()), cfg.rank_fraction,
                                    cfg.d_model)

    start, tokens, train_time, sent, full_sent = 0, 0, 0.0, 0, 0
    metrics_path = out / "metrics.jsonl"
    records: list[dict] = []
    if cfg.resume:
        path = ckpt.latest(ckpt_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {ckpt_dir}")
        written_by = ckpt.read_meta(path)["world"]
        if written_by != world:  # per-process extras and the batch split assume the same world
            raise ValueError(f"{path} was written by {written_by} processes, not {world}")
        meta, extra = ckpt.load(path, net, setup.optimizers)
        if rank == 0:
            print(f"torchdion-train: resuming from {path}", flush=True)
        start, tokens, train_time = meta["step"], meta["tokens"], meta["train_time"]
        sent, full_sent = meta["bytes"], meta["full_bytes"]
        if extra is not None and setup.powersgd is not None:
            setup.powersgd.__setstate__(extra["powersgd"])
        # Drop what the interrupted run logged after its checkpoint.
        if rank == 0 and metrics_path.is_file():
            records = _read_records(metrics_path, start)
    if rank == 0:
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        log = metrics_path.open("a")

    per = cfg.batch // data_world
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=cfg.optimizer, dynamic_ncols=True)

    def emit(rec: dict) -> None:
        if rank == 0:
            log.write(json.dumps(rec) + "\n")
            log.flush()

    val_loss = float("nan")
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        setup.set_lr_factor(lr_factor(cfg, step))
        x, y = batch_windows(data.train, cfg.batch, cfg.seq_len, cfg.seed, step)
        x, y = x[data_rank * per:(data_rank + 1) * per], y[data_rank * per:(data_rank + 1) * per]
        loss = net(x.to(device), y.to(device))
        for o in setup.optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in setup.optimizers:
            o.step()
        step_bytes = setup.step_bytes()
        dt = time.perf_counter() - t0
        train_time += dt
        tokens += cfg.batch * cfg.seq_len
        sent += step_bytes
        full_sent += setup.full_bytes if world > 1 else 0
        (loss_mean,) = _all_sum([loss.item() / world], device)  # tp: world equal losses
        if not math.isfinite(loss_mean):
            raise FloatingPointError(f"training loss is {loss_mean} at step {step + 1}")
        _test_kill(step + 1, rank, "step")
        emit(dict(kind="train", step=step + 1, loss=loss_mean,
                  lr=setup.optimizers[0].param_groups[0]["lr"], tokens=tokens,
                  time=train_time, bytes=sent, full_bytes=full_sent))
        done = step + 1
        if done % cfg.eval_interval == 0 or done == cfg.steps:
            val_loss = evaluate(net, data, cfg, data_rank, data_world, device)
            emit(dict(kind="eval", step=done, val_loss=val_loss, tokens=tokens, time=train_time,
                      bytes=sent, full_bytes=full_sent))
            if bar is not None:
                bar.write(f"step {done}: val loss {val_loss:.4f}")
        if cfg.ckpt_interval and done % cfg.ckpt_interval == 0:
            meta = dict(world=world, tokens=tokens, train_time=train_time, bytes=sent,
                        full_bytes=full_sent, config=asdict(cfg))
            extra = {"powersgd": setup.powersgd.__getstate__()} if setup.powersgd else None
            ckpt.save(ckpt_dir, done, net, setup.optimizers, meta, extra,
                      before_meta=functools.partial(_test_kill, done, rank, "save"))
            ckpt.prune(ckpt_dir, cfg.keep_ckpts)
        if cfg.stop_after and done >= cfg.stop_after:
            break
        if bar is not None:
            bar.set_postfix(loss=f"{loss_mean:.3f}", tok_s=f"{cfg.batch * cfg.seq_len / dt:.0f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    if math.isnan(val_loss):  # resumed at the end: nothing trained, still report the model
        val_loss = evaluate(net, data, cfg, data_rank, data_world, device)
    if rank == 0:
        log.close()
    return dict(
        optimizer=cfg.optimizer, sync=setup.sync, world=world, params=model.num_params(),
        steps=cfg.steps, val_loss=val_loss, unigram_loss=data.unigram_loss(),
        tokens_per_s=tokens / train_time if train_time else float("nan"), train_time=train_time,
        bytes=sent, full_bytes=full_sent, model=model, data=data,
    )
