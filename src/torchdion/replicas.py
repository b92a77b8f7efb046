"""Replicas must start equal: one fingerprint exchange at construction, through the ledger.

A replica that differs in the structure of its parameters (their number, shapes, dtypes, order
or group settings) would pair one matrix's factors with another's in the bucketed all-reduces,
or abort inside gloo on a size mismatch. Replicas whose weights differ would drift apart. Both
are caught before the first step, in two small collectives, and reported naming the first
differing parameter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .comm import Comm
from .validation import CHECKS


def structure_hash(description: str) -> int:
    """A 56-bit hash of a parameter's description, the same in every process (``hash()`` of a
    string is salted per process)."""
    return int.from_bytes(hashlib.blake2b(description.encode(), digest_size=7).digest(), "big")


def weight_fingerprint(t: Tensor) -> Tensor:
    """Four fp64 sums that differ when the values do; no fp64 copy of a large tensor."""
    f64 = torch.float64
    flat = t.flatten()
    return torch.stack([t.sum(dtype=f64), (t * t).sum(dtype=f64), flat[::7].sum(dtype=f64),
                        flat[1::11].sum(dtype=f64)])


def check_replicas(comm: Comm, group: Any, names: Sequence[str], descriptions: Sequence[str],
                   tensors: Sequence[Tensor]) -> None:
    """Raise ValueError unless every replica in ``group`` has the same parameter descriptions
    and the same weights. ``names`` / ``descriptions`` / ``tensors``: per parameter, in order,
    its name for messages, what must match (shape, dtype, group settings) and its local values.
    """
    device = tensors[0].device if tensors else torch.device("cpu")
    n = len(tensors)
    # first the counts (a max of n and of -n), so that the second exchange has one size everywhere
    counts = comm.all_reduce_max([torch.tensor([n, -n], device=device)], group, "fingerprint")[0]
    most, fewest = int(counts[0]), -int(counts[1])
    hashes = torch.full((most,), -1, dtype=torch.int64)
    hashes[:n] = torch.tensor([structure_hash(d) for d in descriptions], dtype=torch.int64)
    weights = torch.zeros(most, 4, dtype=torch.float64, device=device)
    if n:
        weights[:n] = torch.stack([weight_fingerprint(t) for t in tensors])
    hashes = hashes.to(device)
    high_h, high_w = comm.all_reduce_max(
        [torch.cat([hashes, -hashes]), torch.cat([weights, -weights])], group, "fingerprint")
    differ = (high_h[:most] != -high_h[most:]).nonzero().flatten().tolist()
    if differ:
        i = differ[0]
        if i >= n:
            raise ValueError(
                f"replicate_group: this replica has {n} parameters, another has {most}; every "
                "replica must build the same model and parameter groups")
        counted = f" (replicas hold {fewest} to {most} parameters)" if fewest != most else ""
        raise ValueError(
            f"replicate_group: parameter {names[i]} is not the same on every replica: its "
            f"shape, dtype, group or group settings differ (here: {descriptions[i]}){counted}; "
            "every replica must build the same model and parameter groups in the same order")
    low_w = -high_w[most:]
    apart = (high_w[:most] != low_w).any(1).nonzero().flatten().tolist()
    if apart:
        raise ValueError(
            f"replicate_group: replicas start from different weights ({len(apart)} "
            f"parameter(s), first {names[apart[0]]}); broadcast the model from one rank "
            "(or seed it identically) before building the optimizer")


def describe(gi: int, group: dict[str, Any], p: Tensor) -> str:
    """What must be equal on every replica for one parameter: its group, shape, dtype and the
    group's settings (a tensor lr by value: its device may differ between replicas)."""
    settings = {k: (float(v) if isinstance(v, Tensor) else v) for k, v in group.items()
                if k in CHECKS}
    return f"group {gi}, shape {tuple(p.shape)}, {p.dtype}, {sorted(settings.items())}"
