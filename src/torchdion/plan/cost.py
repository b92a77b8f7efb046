"""Time of collectives under an alpha-beta model, and optimizer FLOPs per rank.

A group's link is the slowest it spans: intra-node when all its ranks sit in one node, else
inter-node. Bandwidths are per GPU and per direction (bytes/s); latencies are per ring hop.
Ring algorithms, for a group of p ranks and a payload of n bytes per rank:

    all-reduce   2 (p - 1) alpha + 2 (p - 1) / p * n * beta
    all-gather     (p - 1) alpha +   (p - 1)     * n * beta     (n: the local shard)
    reduce-scatter (p - 1) alpha +   (p - 1) / p * n * beta     (n: the whole input)

with beta = 1 / bandwidth. Collectives run one after another (Dion's rounds depend on each other).
A ring's latency grows linearly with p; ``Cluster(allreduce="tree")`` takes the latency of a
double binary tree instead, 2 ceil(log2 p) alpha, with the same bandwidth term (as NCCL's trees
for small messages on many nodes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .collectives import Collective, DionConfig
from .shard import Parallelism, Param, local_shape, matrix_plan

NS_ITERATIONS = 5
ELEMENTWISE_FLOPS = 10  # per element and step: an AdamW update, counted like matmul FLOPs


@dataclass(frozen=True)
class Cluster:
    """Defaults: H100 nodes of 8 GPUs, NVLink ~360 GB/s and one 400 Gb/s NIC per GPU, the
    matmul rate a fp32-accumulated optimizer step can sustain, 80 GB per GPU."""

    gpus_per_node: int = 8
    intra_bw: float = 360e9
    inter_bw: float = 50e9
    intra_lat: float = 3e-6
    inter_lat: float = 10e-6
    flops: float = 400e12
    gpu_memory: float = 80e9
    allreduce: str = "ring"  # or "tree"

    def __post_init__(self) -> None:
        if self.allreduce not in ("ring", "tree"):
            raise ValueError(f"allreduce must be 'ring' or 'tree', got {self.allreduce!r}")

    def link(self, span: int) -> tuple[float, float]:
        """(bandwidth, latency) of a group whose ranks spread over ``span`` consecutive ranks."""
        if span <= self.gpus_per_node:
            return self.intra_bw, self.intra_lat
        return self.inter_bw, self.inter_lat


def wire_bytes(c: Collective, par: Parallelism) -> float:
    """Bytes one rank sends on the wire for ``c`` with a ring algorithm."""
    p = par.size(c.axis)
    if c.op == "all_reduce":
        return 2 * (p - 1) / p * c.nbytes
    if c.op == "reduce_scatter":
        return (p - 1) / p * c.nbytes
    return (p - 1) * c.nbytes


def collective_time(c: Collective, par: Parallelism, cluster: Cluster) -> float:
    p = par.size(c.axis)
    bw, lat = cluster.link(par.span(c.axis))
    if c.op != "all_reduce":
        hops = p - 1
    elif cluster.allreduce == "tree":
        hops = 2 * math.ceil(math.log2(p)) if p > 1 else 0
    else:
        hops = 2 * (p - 1)
    return hops * lat + wire_bytes(c, par) / bw


def comm_time(collectives: list[Collective], par: Parallelism, cluster: Cluster) -> float:
    return sum(collective_time(c, par, cluster) for c in collectives)


def _elementwise(params: list[Param], par: Parallelism, coords: dict[str, int],
                 matrices: bool) -> float:
    return ELEMENTWISE_FLOPS * sum(math.prod(local_shape(p, par, coords)) for p in params
                                   if matrices or not p.matrix)


def adamw_flops(params: list[Param], par: Parallelism, rank: int = 0) -> float:
    return _elementwise(params, par, par.coords(rank), matrices=True)


def muon_flops(params: list[Param], par: Parallelism, rank: int = 0) -> float:
    """Newton-Schulz on every whole matrix this rank holds a shard of (each rank repeats it):
    per iteration, for an (a, b) matrix, X^T X (2 a b^2), the quintic's A^2 (2 b^3) and the
    product with X (2 a b^2)."""
    flops = _elementwise(params, par, par.coords(rank), matrices=False)
    for p in params:
        if p.matrix:
            a, b = max(p.matrix_shape), min(p.matrix_shape)
            count = math.prod(p.shape[:-2]) if p.stacked else 1  # all of a stack's matrices
            flops += count * NS_ITERATIONS * (4 * a * b * b + 2 * b ** 3)
    return flops


def orthonormalize_flops(a_loc: int, r: int, k: int, method: str) -> float:
    """Local FLOPs of orthonormalizing an (a_loc, r) block of P (triangular solves a r^2,
    Gram 2 a r^2, Cholesky r^3 / 3, sketch 2 k a r, QR of the (k, r) sketch 2 k r^2,
    Householder QR with its Q 4 a r^2)."""
    cholesky = 3 * a_loc * r * r + r ** 3 / 3
    if method == "qr":
        return 4 * a_loc * r * r
    if method == "cholesky":
        return cholesky
    return 2 * k * a_loc * r + 2 * k * r * r + a_loc * r * r + cholesky


def newton_schulz_flops(a_loc: int, k: int, steps: int) -> float:
    """Newton-Schulz on an (a_loc, k) block: per step the Gram 2 a k^2, the polynomial
    b S + c S^2 2 k^3 and the product U (...) 2 a k^2."""
    return steps * (4 * a_loc * k * k + 2 * k ** 3)


def dion_flops(params: list[Param], par: Parallelism, cfg: DionConfig, rank: int = 0) -> float:
    """8 a b r per matrix over the local block (B Q, B^T P, the error feedback P R^T, the update
    P Q^T; B Q and B^T P again per extra power iteration), plus orthonormalization; with the
    Nesterov lookahead (Dion's default) 2 a b r more per power iteration (C^T P beside B^T P).
    Dion2 and Muon: Newton-Schulz on the selected (a_loc, k) columns (the rest is
    element-wise)."""
    coords = par.coords(rank)
    flops = _elementwise(params, par, coords, matrices=False)
    for p in params:
        if p.matrix:
            plan = matrix_plan(p, par, coords, rank_fraction=cfg.rank_fraction,
                               rank_multiple_of=cfg.rank_multiple_of, method=cfg.method,
                               algorithm=cfg.algorithm)
            (a_loc, b_loc), r = plan.local_shape, plan.rank
            if plan.algorithm != "dion":
                flops += newton_schulz_flops(a_loc, r, cfg.ns_steps)
                continue
            count = math.prod(plan.local_batch)  # the matrices of a stack held here
            flops += count * (4 + (6 if cfg.lookahead else 4) * cfg.power_iters) * a_loc * b_loc * r
            flops += count * cfg.power_iters * orthonormalize_flops(a_loc, r, plan.sketch_rows,
                                                                    cfg.method)
    return flops
