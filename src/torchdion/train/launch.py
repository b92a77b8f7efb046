"""Process groups: under torchrun (env://), or N local workers started here on a file store."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


RESTART_VAR = "TORCHDION_RESTART_COUNT"


def restart_count() -> int:
    """How many times this job's workers have been restarted: torchrun's elastic agent says so in
    TORCHELASTIC_RESTART_COUNT, this launcher in RESTART_VAR."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get(RESTART_VAR) or 0)


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _threads(world: int, requested: int) -> None:
    # Workers on one CPU split its cores; oversubscribing them makes every worker slower.
    torch.set_num_threads(requested or max(1, (os.cpu_count() or 1) // world))


def _loopback_interface() -> str | None:
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def exit_without_teardown(code: int = 0) -> None:
    """End this process without interpreter finalization. A process that has used a gloo
    process group can abort there ("terminate called without an active exception", SIGABRT)
    after all its work is done: gloo's threads can still hold finished work whose tensors are
    released during finalization (torch's; pytorch/pytorch pull request 179291 was an atexit fix,
    abandoned). Call it after the last collective (and a barrier), with output flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _record_failure(errors: str, rank: int, e: BaseException) -> None:
    """Note when and how this worker failed: the launcher reports the first failure, not the
    "Connection closed by peer" it caused in the others, whichever of them exits first."""
    record = {"time": time.time(), "rank": rank,
              "error": "".join(traceback.format_exception(type(e), e, e.__traceback__))}
    with open(os.path.join(errors, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


def _worker(rank: int, world: int, init_file: str, threads: int, fn: Callable, args: tuple,
            attempt: int = 0, errors: str | None = None, leave: bool = False) -> None:
    """One worker: join the group at ``init_file`` and call ``fn``. ``errors``: a directory to
    record a failure in; ``leave``: end the process when done (the spawned workers)."""
    os.environ[RESTART_VAR] = str(attempt)
    _threads(world, threads)
    # Every worker runs on this machine, so gloo's sockets belong on loopback: by default gloo
    # listens on the address the hostname resolves to, often one the network can reach.
    # GLOO_SOCKET_IFNAME set by the user wins.
    loopback = _loopback_interface()
    if loopback is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    device = _device(rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"file://{init_file}", rank=rank, world_size=world)
    _call_in_group(fn, rank, world, device, args, errors, leave)


def _call_in_group(fn: Callable, rank: int, world: int, device, args: tuple,
                   errors: str | None, leave: bool) -> None:
    try:
        fn(rank, world, device, *args)
    except BaseException as e:
        if errors is not None:
            _record_failure(errors, rank, e)
        if dist.is_initialized():  # the others' collectives fail now, not at a timeout
            dist.destroy_process_group()
        raise
    if leave:
        dist.barrier()
        exit_without_teardown()
    dist.destroy_process_group()


class WorkerError(RuntimeError):
    """A worker of the job failed (and no restart was left)."""


def _first_failure(errors: str, e: BaseException) -> str:
    """What to tell the user about a failed attempt: a worker killed by a signal as the
    launcher saw it; otherwise the worker that raised first, with its traceback."""
    records = []
    for name in os.listdir(errors):
        try:
            with open(os.path.join(errors, name)) as f:
                records.append(json.load(f))
        except (OSError, ValueError):  # cut short: that worker was terminated while writing
            continue
    if getattr(e, "signal_name", None) or not records:
        return str(e).rstrip()
    first = min(records, key=lambda r: r["time"])
    others = len(records) - 1
    after = f" ({others} other worker{'s' if others > 1 else ''} failed after it)" if others \
        else ""
    return f"worker {first['rank']} failed first{after}:\n{first['error'].rstrip()}"


def run(fn: Callable, nproc: int, threads: int, args: tuple = (), max_restarts: int = 0) -> None:
    """Call ``fn(rank, world, device, *args)`` in every process of the job.

    Under torchrun this process is one rank (torchrun's own --max-restarts restarts it); it
    ends here when ``fn`` returns (see :func:`exit_without_teardown`). Otherwise ``nproc`` > 1
    spawns that many workers on this machine, meeting at a file store in a fresh temporary
    directory (no port to clash); when one fails the others are terminated and, up to
    ``max_restarts`` times, all are started again (``restart_count()`` tells them); then
    :class:`WorkerError` says which worker failed first and how.
    ``nproc`` == 1 runs here without a process group, unless restarts are asked for: then it is
    one spawned worker, so that a crash of it leaves this process alive to start it again.
    """
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        _threads(int(os.environ.get("LOCAL_WORLD_SIZE", world)), threads)
        device = _device(local)
        store, rank, _ = next(dist.rendezvous("env://"))
        # torchrun's restarted workers share its rendezvous store with the dead ones, whose
        # addresses are still in it: gloo then connects to ports nobody listens on. A prefix per
        # attempt keeps each attempt's keys apart (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 also
        # works, but has to be set by whoever starts torchrun).
        store = dist.PrefixStore(f"torchdion/attempt_{restart_count()}", store)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                                rank=rank, world_size=world)
        _call_in_group(fn, dist.get_rank(), world, device, args, None, leave=True)
        return
    if nproc == 1 and max_restarts == 0:
        _threads(1, threads)
        fn(0, 1, _device(0), *args)
        return
    for attempt in range(max_restarts + 1):
        # A fresh store each time: the dead attempt's file still holds its ranks' keys.
        with tempfile.TemporaryDirectory(prefix="torchdion-rdzv-") as tmp:
            errors = os.path.join(tmp, "errors")
            os.mkdir(errors)
            try:
                # join() terminates the survivors of a failed worker before raising; without
                # that they would sit in a collective until gloo's 30-minute timeout.
                mp.start_processes(
                    _worker, args=(nproc, os.path.join(tmp, "store"), threads, fn, args, attempt,
                                   errors, True),
                    nprocs=nproc, start_method="spawn", join=True)
                return
            except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
                failure = _first_failure(errors, e)
                if attempt == max_restarts:
                    raise WorkerError(failure) from None
                who = "the worker" if nproc == 1 else f"all {nproc} workers"
                print(f"torchdion-train: {failure}\ntorchdion-train: restarting {who} "
                      f"({attempt + 1} of {max_restarts})", file=sys.stderr, flush=True)
