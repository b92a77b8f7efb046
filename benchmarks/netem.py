"""Step time and bytes per step of data-parallel training on rate-limited links (needs root).

Four ranks, each in its own network namespace, reach each other through veth pairs plugged into
a bridge that lives in a fifth namespace. Every link is shaped in both directions with tc (tbf at
the given rate), so a rank sends and receives at that rate, as on a switch with one NIC per
host. Addresses are 10.77.0.0/24 and exist only inside those namespaces; gloo binds to the veth
(GLOO_SOCKET_IFNAME) and the rendezvous store listens on rank 0's namespace address, so no
traffic leaves them. The namespaces are removed at the end, on failure, on Ctrl-C and on
SIGTERM; a run also removes the leftovers of an earlier run that was killed outright.

Arms (each a fresh set of 4 processes per link rate, killed past --arm-timeout):

- ddp-adamw: DDP (all-reduce of every gradient) + AdamW
- ddp-powersgd-16, ddp-powersgd-4: DDP with torch's powerSGD_hook at rank ceil(d / 16) and
  ceil(d / 4) (48 and 192 at d = 768, Dion's ranks at 1/16 and 1/4), compressing from step 2
  every gradient whose factors are smaller than it (min_compression_rate 1), + AdamW; one DDP
  bucket (see worker())
- dion-full: DDP + Dion(rank 1/4, gradients_synchronized=True): full gradients, Dion sends nothing
- dion-4, dion-16: no DDP, Dion(replicate_group=WORLD) at rank fraction 1/4 and 1/16: P and R
  factors for the matrices, one bucketed all-reduce for the element-wise gradients

The model is a stack of GPT-2-small blocks (c_attn 2304 x 768, attn proj 768 x 768, c_fc
3072 x 768, mlp proj 768 x 3072, LayerNorms and biases) with a real causal-attention forward,
but a 256-token vocabulary and a 64-position context: GPT-2's 50257 x 768 embedding is trained
element-wise by AdamW in every arm, so its full all-reduce (38.6M of GPT-2 small's 124M
parameters) would be the same in all of them and hide the compression of the matrices.

Measured per step, after warm-up, median over steps: wall time (each step starts at a barrier;
the step's time is the slowest rank's forward + backward + optimizer step), payload bytes (the
tensors handed to torch.distributed.all_reduce; for Dion also checked against opt.comm_stats()),
and bytes on the wire (the veth's tx counter, headers included). Communication time per step is
measured three ways: the last step's all-reduces replayed on their own, back to back ("replayed",
every arm: what the planner predicts); the time spent inside blocking all_reduce calls during
the step, fastest rank ("in step", Dion compressed only: DDP overlaps its collectives with the
backward, and Dion's whole-gradient bucket is asynchronous, overlapped with its factor
computation); and the step time minus the same arm's step time on the unshaped link ("excess",
what overlap leaves exposed). Each is set next to torchdion.plan's alpha-beta prediction for
the same collectives.

    sudo .venv/bin/python benchmarks/netem.py --markdown benchmarks/results/netem.md
    sudo .venv/bin/python benchmarks/netem.py --rates 100mbit --arms ddp-adamw dion-16 --steps 3
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PREFIX = "tdnetem"  # every namespace this script creates starts with it
BRIDGE_NS = f"{PREFIX}-br"
SUBNET = "10.77.0"
IFNAME = "eth0"  # the veth end inside each rank's namespace (names are per namespace)
WORLD = 4
MB = 1e6
ARMS = ("ddp-adamw", "ddp-powersgd-16", "ddp-powersgd-4", "dion-full", "dion-4", "dion-16")
LABELS = {
    "ddp-adamw": "DDP + AdamW",
    "ddp-powersgd-16": "DDP + PowerSGD r=d/16 + AdamW",
    "ddp-powersgd-4": "DDP + PowerSGD r=d/4 + AdamW",
    "dion-full": "DDP + Dion 1/4 (full gradient sync)",
    "dion-4": "Dion compressed, rank 1/4",
    "dion-16": "Dion compressed, rank 1/16",
}
UNLIMITED = "unlimited"


def rank_ns(rank: int) -> str:
    return f"{PREFIX}-r{rank}"


def rate_bits(rate: str) -> float:
    """tc's rate syntax (100mbit, 1gbit, 500kbit) in bits per second."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}
    text = rate.lower()
    for unit, scale in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise argparse.ArgumentTypeError(f"rate must look like 100mbit or 1gbit, got {rate!r}")


def rate_label(rate: str) -> str:
    if rate == UNLIMITED:
        return "unshaped veth"
    bits = rate_bits(rate)
    return f"{bits / 1e9:g} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:g} Mbit/s"


# ------------------------------------------------------------------------------ the network

def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def our_namespaces() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(PREFIX + "-")]


def remove_namespaces() -> None:
    """Kill what runs inside our namespaces, then delete them (deleting a namespace takes its
    veth ends, and so both ends of every pair, with it). Idempotent; never raises."""
    for ns in our_namespaces():
        pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        # A namespace whose processes are still dying keeps its links alive: wait a moment.
        for _ in range(50):
            if not sh("ip", "netns", "pids", ns, check=False).stdout.split():
                break
            time.sleep(0.1)
        sh("ip", "netns", "delete", ns, check=False)


def create_network() -> None:
    sh("ip", "netns", "add", BRIDGE_NS)
    sh("ip", "-n", BRIDGE_NS, "link", "set", "lo", "up")
    sh("ip", "-n", BRIDGE_NS, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", BRIDGE_NS, "link", "set", "br0", "up")
    for r in range(WORLD):
        ns, port = rank_ns(r), f"p{r}"
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # Created from inside the rank's namespace with the peer placed straight into the
        # bridge's: no interface ever appears in the root namespace.
        sh("ip", "-n", ns, "link", "add", IFNAME, "type", "veth", "peer", "name", port,
           "netns", BRIDGE_NS)
        sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{r + 1}/24", "dev", IFNAME)
        sh("ip", "-n", ns, "link", "set", IFNAME, "up")
        sh("ip", "-n", BRIDGE_NS, "link", "set", port, "master", "br0")
        sh("ip", "-n", BRIDGE_NS, "link", "set", port, "up")


def shape_links(rate: str) -> None:
    """tbf on both ends of every veth: the rank's end shapes what it sends, the bridge's end
    what it receives. netem (which could add delay) is not in every kernel; tbf is."""
    ends = [(rank_ns(r), IFNAME) for r in range(WORLD)]
    ends += [(BRIDGE_NS, f"p{r}") for r in range(WORLD)]
    for ns, dev in ends:
        sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
        if rate != UNLIMITED:
            # A burst of ~2 ms at the rate (at least 64 KiB) lets tbf reach its rate on a busy
            # CPU; 100 ms of queue keeps TCP from losing packets at the limit.
            burst = max(64 * 1024, int(rate_bits(rate) / 8 * 2e-3))
            sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
               "burst", str(burst), "latency", "100ms")


def check_environment() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    probe = f"{PREFIX}-probe{os.getpid()}"
    try:
        if sh("ip", "netns", "add", probe, check=False).returncode:
            return "`ip netns add` failed"
        if sh("ip", "-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
              check=False).returncode:
            return "cannot create veth pairs"
        if sh("tc", "-n", probe, "qdisc", "add", "dev", "v0", "root", "tbf", "rate", "1gbit",
              "burst", "64kb", "latency", "100ms", check=False).returncode:
            return "tc tbf is not available"
    except FileNotFoundError as e:
        return f"{e.filename} not found"
    finally:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


# ------------------------------------------------------------------------------ the arms

def run_arm(arm: str, rate: str, args: argparse.Namespace, out_dir: Path, port: int,
            timeout: float) -> tuple[list[dict] | None, str]:
    """Start the 4 ranks of one arm in their namespaces; (per-rank results, status)."""
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for r in range(WORLD):
            env = dict(os.environ, MASTER_ADDR=f"{SUBNET}.1", MASTER_PORT=str(port), RANK=str(r),
                       WORLD_SIZE=str(WORLD), GLOO_SOCKET_IFNAME=IFNAME, OMP_NUM_THREADS="1")
            cmd = ["ip", "netns", "exec", rank_ns(r), sys.executable,
                   str(Path(__file__).resolve()), "--worker", arm, "--rate", rate,
                   "--out", str(out_dir / f"{arm}.{rate}.{r}.json"),
                   "--layers", str(args.layers), "--d-model", str(args.d_model),
                   "--batch", str(args.batch), "--seq", str(args.seq),
                   "--warmup", str(args.warmup), "--steps", str(args.steps),
                   "--replays", str(args.replays),
                   "--probe-mb", str(args.probe_mb),
                   "--self-destruct", str(timeout + 30)]
            log = open(out_dir / f"{arm}.{rate}.{r}.log", "w")
            logs.append(log)
            # Own session: a Ctrl-C on the terminal reaches only this script, which then kills
            # each rank's process group itself before removing the namespaces.
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                return None, f"killed after {timeout:.0f} s"
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(2)  # let the other ranks report their side of the failure
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if any(codes):
        # The rank that failed first, not one the driver killed afterwards.
        first = next((r for r, c in enumerate(codes) if c not in (0, -signal.SIGKILL)), 0)
        tail = (out_dir / f"{arm}.{rate}.{first}.log").read_text()[-2000:]
        return None, f"failed (exit codes {codes}):\n{tail}"
    return [json.loads((out_dir / f"{arm}.{rate}.{r}.json").read_text())
            for r in range(WORLD)], "ok"


# ------------------------------------------------------------------------------ one rank

def build_model(layers: int, d: int, seq: int):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = d // 64
            self.ln_1 = nn.LayerNorm(d)
            self.c_attn = nn.Linear(d, 3 * d)
            self.attn_proj = nn.Linear(d, d)
            self.ln_2 = nn.LayerNorm(d)
            self.c_fc = nn.Linear(d, 4 * d)
            self.mlp_proj = nn.Linear(4 * d, d)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2)
                       for t in self.c_attn(self.ln_1(x)).split(d, dim=-1))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, d))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(256, d)
            self.wpe = nn.Embedding(seq, d)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f = nn.LayerNorm(d)
            for emb in (self.wte, self.wpe):
                nn.init.normal_(emb.weight, std=0.02)  # GPT-2's; N(0, 1) through the tied head
                # gives logits in the hundreds

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe.weight[: idx.shape[1]]
            for block in self.blocks:
                x = block(x)
            logits = F.linear(self.ln_f(x), self.wte.weight)  # head tied to the embedding
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    torch.manual_seed(0)  # replicas start equal
    return Net()


def dion_groups(model, fraction: float) -> list[dict]:
    import torchdion

    # The element-wise tensors take AdamW's learning rate, not Dion's 0.02.
    return torchdion.param_groups(model, dion=dict(rank_fraction=fraction),
                                  embedding=dict(lr=3e-4), other=dict(lr=3e-4))


def net_counters() -> tuple[int, int]:
    """(rx, tx) bytes of this namespace's veth; /proc/net/dev is per network namespace."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == IFNAME:
            fields = rest.split()
            return int(fields[0]), int(fields[8])
    return 0, 0


def worker(args: argparse.Namespace) -> None:
    # A parent killed with SIGKILL cannot kill us; past the arm's time we go by ourselves.
    threading.Timer(args.self_destruct, lambda: os._exit(3)).start()
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    from torch.nn.parallel import DistributedDataParallel as DDP

    import torchdion
    from torchdion import plan

    torch.set_num_threads(1)  # 4 ranks share the machine's cores
    dist.init_process_group("gloo")
    rank, arm = dist.get_rank(), args.worker
    model = build_model(args.layers, args.d_model, args.seq)

    # Count and time every all_reduce the step hands to torch.distributed (the DDP hooks below,
    # PowerSGD and Dion all call it through the module attribute).
    counting = {"on": False, "calls": [], "blocking_s": 0.0}
    plain_all_reduce = dist.all_reduce

    def all_reduce(tensor, *a, **kw):
        if not counting["on"]:
            return plain_all_reduce(tensor, *a, **kw)
        counting["calls"].append([tensor.numel(), tensor.element_size()])
        if kw.get("async_op"):
            return plain_all_reduce(tensor, *a, **kw)
        t0 = time.perf_counter()
        out = plain_all_reduce(tensor, *a, **kw)
        counting["blocking_s"] += time.perf_counter() - t0
        return out

    dist.all_reduce = all_reduce

    opt: Any
    if arm.startswith("ddp") or arm == "dion-full":
        buckets = {}
        if arm.startswith("ddp-powersgd"):
            # One bucket: the hook issues its P and Q all-reduces from future callbacks on
            # gloo's threads, and with several buckets the ranks issued them in different
            # orders and gloo aborted. PowerSGD's bytes do not depend on the bucketing.
            size = sum(p.numel() * p.element_size() for p in model.parameters())
            buckets = dict(bucket_cap_mb=size / 2**20 + 1)
        net = DDP(model, **buckets)
        if arm.startswith("ddp-powersgd"):
            r = math.ceil(args.d_model / int(arm.rsplit("-", 1)[1]))
            state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=r,
                                       start_powerSGD_iter=2, min_compression_rate=1)
            net.register_comm_hook(state, psgd.powerSGD_hook)
        else:
            # The stock all-reduce, through torch.distributed.all_reduce so it is counted.
            net.register_comm_hook(None, default_hooks.allreduce_hook)
        if arm == "dion-full":
            opt = torchdion.Dion(dion_groups(model, 0.25), lr=0.02,
                                 replicate_group=dist.group.WORLD, gradients_synchronized=True)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95))
    else:
        net = model
        fraction = 1 / int(arm.rsplit("-", 1)[1])
        opt = torchdion.Dion(dion_groups(model, fraction), lr=0.02,
                             replicate_group=dist.group.WORLD)

    # One hop's latency as gloo sees it: a 1-element all-reduce is 2 (W - 1) hops on a ring.
    tiny = torch.zeros(1)
    lat = seconds(lambda: plain_all_reduce(tiny), repeats=30, warmup=5)
    hop_latency = statistics.median(lat) / (2 * (WORLD - 1))
    probe = None
    if args.probe_mb:
        # Bus bandwidth of one large all-reduce: the ring's wire bytes per rank over its time.
        big = torch.zeros(int(args.probe_mb * MB / 4))
        times = seconds(lambda: plain_all_reduce(big), repeats=2, warmup=1)
        probe = 2 * (WORLD - 1) / WORLD * big.numel() * 4 / min(times)

    gen = torch.Generator().manual_seed(1000 + rank)  # each replica its own data
    steps = []
    counters = None
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            counters = net_counters()
        idx = torch.randint(0, 256, (args.batch, args.seq + 1), generator=gen)
        dist.barrier()
        counting.update(on=True, calls=[], blocking_s=0.0)
        t0 = time.perf_counter()
        loss = net(idx[:, :-1], idx[:, 1:])
        loss.backward()
        loss = loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        counting["on"] = False
        ledger = opt.comm_stats()["bytes"] if isinstance(opt, torchdion.Dion) else None
        steps.append(dict(time=elapsed, calls=counting["calls"], blocking=counting["blocking_s"],
                          payload=sum(n * s for n, s in counting["calls"]), ledger=ledger,
                          loss=loss.item()))
    rx, tx = net_counters()
    replayed = replay(steps[-1]["calls"], plain_all_reduce, args.replays)
    result = dict(
        rank=rank, arm=arm, rate=args.rate, hop_latency=hop_latency, probe=probe,
        steps=steps[args.warmup:], replayed=replayed,
        tx_per_step=(tx - counters[1]) / args.steps, rx_per_step=(rx - counters[0]) / args.steps,
        # as torchdion.param_groups sorts them: which tensors Dion treats as matrices
        params=[[p.name, list(p.shape), p.matrix, p.itemsize]
                for p in plan.params_from_module(model)])
    Path(args.out).write_text(json.dumps(result))
    dist.destroy_process_group()
    os._exit(0)  # the self-destruct timer thread must not keep us alive


def seconds(fn, repeats: int, warmup: int = 0) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of fn, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def replay(calls: list, all_reduce, repeats: int) -> list[float]:
    """Seconds to run a step's all-reduces again, in order and back to back, on their own:
    the step's communication without the compute it overlaps or waits for."""
    import torch
    import torch.distributed as dist

    dtypes = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}
    buffers = [torch.zeros(n, dtype=dtypes[size]) for n, size in calls]
    times = []
    for _ in range(repeats):
        dist.barrier()
        times += seconds(lambda: [all_reduce(b) for b in buffers], repeats=1)
    dist.barrier()
    return times


# ------------------------------------------------------------------------------ the analysis

def plan_params(summary: dict) -> list:
    from torchdion import plan

    return [plan.Param(name, tuple(shape), matrix, None, itemsize)
            for name, shape, matrix, itemsize in summary["params"]]


def planner_collectives(arm: str, summary: dict) -> list | None:
    """What torchdion.plan says the arm's step sends, for the arms it models."""
    from torchdion import plan

    params, par = plan_params(summary), plan.Parallelism(dp=WORLD)
    if arm in ("ddp-adamw", "dion-full"):
        return plan.adamw_collectives(params, par)  # dion-full: Dion itself sends nothing
    if arm.startswith("dion-"):
        cfg = plan.DionConfig(rank_fraction=1 / int(arm.rsplit("-", 1)[1]))
        return plan.dion_collectives(params, par, cfg)
    return None


def predict(arm: str, summary: dict, bandwidth: float, latency: float) -> float:
    """torchdion.plan's communication seconds per step: plan.predict_comm_time from the shapes
    for AdamW and Dion; PowerSGD, which the planner does not model, priced by the planner's
    collective_time on the all-reduces its hook was measured to issue."""
    from torchdion import plan

    if arm in ("ddp-adamw", "dion-full"):
        return plan.predict_comm_time(plan_params(summary), WORLD, bandwidth, latency,
                                      optimizer="adamw")
    if arm.startswith("dion-"):
        cfg = plan.DionConfig(rank_fraction=1 / int(arm.rsplit("-", 1)[1]))
        return plan.predict_comm_time(plan_params(summary), WORLD, bandwidth, latency,
                                      optimizer=cfg)
    par = plan.Parallelism(dp=WORLD)
    link = plan.Cluster(gpus_per_node=WORLD, intra_bw=bandwidth, intra_lat=latency)
    return sum(plan.collective_time(plan.Collective("all_reduce", "dp", "grad", n, s), par, link)
               for n, s in summary["calls"])


def summarize(ranks: list[dict]) -> dict[str, Any]:
    arm, n = ranks[0]["arm"], len(ranks[0]["steps"])
    per_step = [max(r["steps"][i]["time"] for r in ranks) for i in range(n)]
    # The fastest rank's time in blocking all-reduces: slower ranks also wait there for it.
    blocking = [min(r["steps"][i]["blocking"] for r in ranks) for i in range(n)]
    # Likewise per replay: the rank that left the barrier last waited for nobody.
    replayed = [min(r["replayed"][i] for r in ranks) for i in range(len(ranks[0]["replayed"]))]
    payloads = sorted({s["payload"] for r in ranks for s in r["steps"]})
    ledgers = sorted({s["ledger"] for r in ranks for s in r["steps"] if s["ledger"] is not None})
    if arm in ("dion-4", "dion-16") and ledgers != payloads:
        raise RuntimeError(f"{arm}: opt.comm_stats() bytes {ledgers} != all_reduce {payloads}")
    probe = [r["probe"] for r in ranks if r.get("probe")]
    return dict(
        arm=arm, step=statistics.median(per_step), steps=per_step,
        blocking=statistics.median(blocking), replayed=statistics.median(replayed),
        payload=payloads[-1],
        ledger=ledgers[-1] if ledgers else None,
        collectives=len(ranks[0]["steps"][-1]["calls"]), calls=ranks[0]["steps"][-1]["calls"],
        wire=statistics.mean(r["tx_per_step"] for r in ranks),
        hop_latency=statistics.median(r["hop_latency"] for r in ranks),
        probe_bw=min(probe) if probe else None,
        loss=statistics.mean(r["steps"][-1]["loss"] for r in ranks), params=ranks[0]["params"])


def within(measured: float, predicted: float) -> str:
    if predicted <= 0:
        return "-"
    ratio = measured / predicted
    return f"{ratio:.2f} ({'yes' if abs(ratio - 1) <= 0.25 else 'no'})"


def report(results: dict, rates: list[str], arms: list[str], args: argparse.Namespace,
           command: str, started: str, statuses: dict) -> str:
    import torch

    lines = [
        "# Data-parallel training on rate-limited links (4 ranks, network namespaces)", "",
        f"{started}, {platform.machine()} ({os.cpu_count()} cores, shared with other jobs), "
        f"Linux {platform.release()}, torch {torch.__version__}, gloo over veth. "
        f"Command (as root): `{command}`", "",
    ]
    any_summary = next((s for per in results.values() for s in per.values()), None)
    if any_summary:
        n_params = sum(math.prod(s) for _, s, _, _ in any_summary["params"])
        n_matrix = sum(math.prod(s) for _, s, m, _ in any_summary["params"] if m)
        lines += [
            f"Model: {args.layers} GPT-2-small blocks (d = {args.d_model}: c_attn "
            f"{3 * args.d_model} x {args.d_model}, attn proj {args.d_model} x {args.d_model}, "
            f"c_fc {4 * args.d_model} x {args.d_model}, mlp proj {args.d_model} x "
            f"{4 * args.d_model}), a 256 x {args.d_model} embedding (head tied) and a "
            f"{args.seq}-position one: {n_params:,} parameters, {n_matrix:,} of them in the "
            "hidden matrices. GPT-2's 50257-row embedding is left out: it is element-wise "
            "AdamW in every arm and its full all-reduce would hide the matrices' compression. "
            f"Per rank and step: {args.batch} x {args.seq} tokens, fp32, 1 thread. "
            f"{args.warmup} warm-up steps, then the median of {args.steps}; a step's time is "
            "the slowest rank's (each step starts at a barrier).", "",
        ]
    lines += [
        "Links: each rank's veth is shaped with tc tbf at the rate in both directions "
        "(rank -> bridge and bridge -> rank). No delay is added: this kernel has no netem "
        "(sch_netem), only tbf/htb; the latency column is what gloo sees on the veth. "
        "Payload: bytes handed to all_reduce per rank and step (for Dion equal to "
        "`opt.comm_stats()`); wire: the veth's tx bytes per rank and step, TCP/IP included "
        "(a ring all-reduce sends 1.5 x the payload at 4 ranks). PowerSGD runs with every "
        "gradient in one DDP bucket (with several, gloo aborted: the hook issues collectives "
        "from future callbacks, in different orders on different ranks); the other DDP arms "
        "use DDP's default buckets.", "",
    ]
    lines += ["| link | one-hop latency (tiny all-reduce / 6) | gloo all-reduce bandwidth "
              "(16 MB, bus) |", "| --- | ---: | ---: |"]
    for rate in rates:
        per = results.get(rate, {})
        lat = [s["hop_latency"] for s in per.values()]
        bw = [s["probe_bw"] for s in per.values() if s["probe_bw"]]
        lat_cell = f"{statistics.median(lat) * 1e6:.0f} us" if lat else "-"
        lines.append(f"| {rate_label(rate)} | {lat_cell} | "
                     + (f"{bw[0] / MB:.1f} MB/s |" if bw else "- |"))
    lines += ["", "## Step time and bytes", ""]
    head = ["arm", "payload MB / step", "wire MB / step"]
    head += [f"step s, {rate_label(r)}" for r in rates]
    head += [f"vs DDP + AdamW, {rate_label(r)}" for r in rates if r != UNLIMITED]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" + " ---: |" * (len(head) - 1)]
    for arm in arms:
        anyrate = next((results[r][arm] for r in rates[::-1] if arm in results.get(r, {})), None)
        cells = [LABELS[arm], f"{anyrate['payload'] / MB:.2f}" if anyrate else "-",
                 f"{anyrate['wire'] / MB:.2f}" if anyrate else "-"]
        for rate in rates:
            s = results.get(rate, {}).get(arm)
            cells.append(f"{s['step']:.3f}" if s else statuses.get((arm, rate), "-"))
        for rate in rates:
            if rate == UNLIMITED:
                continue
            s, base = results.get(rate, {}).get(arm), results.get(rate, {}).get("ddp-adamw")
            cells.append(f"{base['step'] / s['step']:.2f}x" if s and base else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Wire MB is from the slowest link's run. Steps (s) per run, in order:", ""]
    for rate in rates:
        for arm in arms:
            s = results.get(rate, {}).get(arm)
            if s:
                lines.append(f"- {LABELS[arm]}, {rate_label(rate)}: "
                             + ", ".join(f"{t:.3f}" for t in s["steps"])
                             + f" (loss after the last: {s['loss']:.3f})")
    lines += target_lines(results, rates)
    lines += planner_lines(results, rates, arms)
    failed = [f"- {LABELS[a]}, {rate_label(r)}: {msg}" for (a, r), msg in statuses.items()
              if msg != "ok"]
    if failed:
        lines += ["", "## Runs that did not finish", ""] + failed
    return "\n".join(lines) + "\n"


def target_lines(results: dict, rates: list[str]) -> list[str]:
    slow = [r for r in rates if r != UNLIMITED]
    if not slow:
        return []
    rate = min(slow, key=rate_bits)
    s, base = results.get(rate, {}).get("dion-16"), results.get(rate, {}).get("ddp-adamw")
    if not (s and base):
        return []
    speedup = base["step"] / s["step"]
    return ["", f"**Target** (Dion compressed at rank 1/16 at least 4x faster per step than "
            f"DDP + AdamW at the slowest link, {rate_label(rate)}): {speedup:.2f}x, "
            f"{'met' if speedup >= 4 else 'not met'}."]


def planner_lines(results: dict, rates: list[str], arms: list[str]) -> list[str]:
    base = results.get(UNLIMITED, {})
    out = ["", "## Measured communication time against torchdion.plan", "",
           "Planner: `torchdion.plan.predict_comm_time(params, 4, bandwidth, latency, optimizer)` "
           "(ring all-reduce alpha-beta model; params from `plan.params_from_module`, so the "
           "same tensors are matrices as in `param_groups`) with bandwidth = the tbf rate / 8 "
           "(nominal, not the measured all-reduce bandwidth) and latency = the one-hop latency "
           "measured in the same run. PowerSGD is not in the planner: its row prices the "
           "all-reduces the hook issued with `plan.collective_time`. Ratio = measured / "
           "predicted; within 25%: 0.75 to 1.25.", "",
           "Measured three ways. *Replayed*: after the timed steps every rank runs the last "
           "step's all-reduces again (same sizes and order, back to back, blocking), median of "
           "the replays, the rank that left the starting barrier last; this is the quantity the "
           "planner predicts. *In step*: time inside blocking all_reduce calls during the step, "
           "fastest rank (Dion compressed only: its P and R exchanges; the whole-gradient bucket "
           "is asynchronous and not included, and DDP overlaps all of its all-reduces with the "
           "backward). *Excess*: step time minus the same arm's on the unshaped veth, against "
           "the planner's time at the rate minus its time at the unshaped veth's measured "
           "all-reduce bandwidth; what overlap leaves exposed, so below 1 where the arm "
           "overlaps.", "",
           "| arm | link | planner payload MB (measured) | planner s | replayed s | replayed / "
           "planner | in step s | in step / planner | excess s | excess / planner excess |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for rate in rates:
        if rate == UNLIMITED:
            continue
        for arm in arms:
            s, b = results.get(rate, {}).get(arm), base.get(arm)
            if not s:
                continue
            coll = planner_collectives(arm, s)
            payload = (f"{sum(c.nbytes for c in coll) / MB:.2f} ({s['payload'] / MB:.2f})"
                       if coll is not None else f"- ({s['payload'] / MB:.2f})")
            pred = predict(arm, s, rate_bits(rate) / 8, s["hop_latency"])
            cells = [LABELS[arm], rate_label(rate), payload, f"{pred:.3f}",
                     f"{s['replayed']:.3f}", within(s["replayed"], pred)]
            if arm in ("dion-4", "dion-16"):
                cells += [f"{s['blocking']:.3f}", within(s["blocking"], pred)]
            else:
                cells += ["-", "-"]
            if b and b.get("probe_bw_run"):
                pred_base = predict(arm, b, b["probe_bw_run"], b["hop_latency"])
                excess = s["step"] - b["step"]
                cells += [f"{excess:.3f}", within(excess, pred - pred_base)]
            else:
                cells += ["-", "-"]
            out.append("| " + " | ".join(cells) + " |")
    return out


# ------------------------------------------------------------------------------ the driver

class Interrupted(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", nargs="+", default=["1gbit", "100mbit"],
                    help="tc rates; the unshaped veth runs first as the baseline")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the unshaped runs (and with them the measured excess)")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank and step")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3, help="PowerSGD compresses from step 2")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--replays", type=int, default=3,
                    help="times the last step's all-reduces are replayed on their own")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds for the whole run")
    ap.add_argument("--arm-timeout", type=float, default=300, help="seconds for one arm")
    ap.add_argument("--markdown", help="write the results here")
    ap.add_argument("--json", help="write the raw summaries here")
    # one rank of one arm, started by the driver inside its namespace
    ap.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    ap.add_argument("--rate", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--probe-mb", type=float, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--self-destruct", type=float, default=600, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    for rate in args.rates:
        rate_bits(rate)
    if os.geteuid() != 0:
        print("netem benchmark: needs root (network namespaces and tc)", file=sys.stderr)
        return 2
    lock = open(Path(tempfile.gettempdir()) / f"{PREFIX}.lock", "w")
    try:
        # Leftover cleanup below kills what runs in our namespaces: never another live run's.
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("netem benchmark: another run holds the lock", file=sys.stderr)
        return 2
    why = check_environment()
    if why:
        print(f"netem benchmark: {why}", file=sys.stderr)
        return 2

    def on_signal(signum, frame):
        signal.signal(signum, signal.SIG_IGN)  # a second signal must not interrupt cleanup
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    command = ".venv/bin/python benchmarks/netem.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    deadline = time.monotonic() + args.timeout
    rates = [] if args.no_baseline else [UNLIMITED]
    rates += [r for r in args.rates if r != UNLIMITED]
    results: dict[str, dict[str, dict]] = {}
    statuses: dict[tuple[str, str], str] = {}
    interrupted = None
    port = 29500
    try:
        with tempfile.TemporaryDirectory(prefix=PREFIX) as tmp:
            remove_namespaces()  # an earlier run killed outright (SIGKILL) left these
            create_network()
            # Arm by arm, each over every link: an arm's shaped runs and its unshaped baseline
            # run minutes apart rather than the whole benchmark apart (the CPU load drifts).
            for arm in args.arms:
                for rate in rates:
                    left = deadline - time.monotonic()
                    if left < 10:
                        statuses[(arm, rate)] = "skipped (--timeout)"
                        continue
                    shape_links(rate)
                    port += 1
                    run_args = argparse.Namespace(**vars(args))
                    # The first arm also measures gloo's all-reduce bandwidth on each link.
                    run_args.probe_mb = 16 if arm == args.arms[0] else 0
                    t0 = time.monotonic()
                    ranks, status = run_arm(arm, rate, run_args, Path(tmp), port,
                                            min(args.arm_timeout, left))
                    statuses[(arm, rate)] = status if status == "ok" else status.split(":")[0]
                    print(f"{rate_label(rate):>14} {LABELS[arm]:<38} "
                          f"{time.monotonic() - t0:6.1f} s  {status}", flush=True)
                    if ranks:
                        try:
                            results.setdefault(rate, {})[arm] = summarize(ranks)
                        except RuntimeError as e:
                            statuses[(arm, rate)] = f"failed: {e}"
            for per in results.values():
                probe = [s["probe_bw"] for s in per.values() if s["probe_bw"]]
                for s in per.values():
                    s["probe_bw_run"] = probe[0] if probe else None
    except Interrupted as e:
        interrupted = str(e)
    finally:
        remove_namespaces()
        left = our_namespaces()
        if left:
            print(f"netem benchmark: could not remove {left}", file=sys.stderr)
    text = report(results, rates, args.arms, args, command, started, statuses)
    if interrupted:
        text += f"\nInterrupted by {interrupted}: partial results.\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {r: {a: {k: v for k, v in s.items() if k != "params"} for a, s in per.items()}
             for r, per in results.items()}, indent=1))
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
