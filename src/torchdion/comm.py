"""Every collective the optimizer issues, bucketed, and the ledger that records them.

A request is completed by one all-reduce per axis that the layout splits. Requests of one
lockstep round that share a process group and dtype travel in one flat buffer, so the number of
collectives per step depends on the number of distinct groups, not on the number of matrices.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .reduce import Reduce


def group_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


@dataclass
class Ledger:
    """What this process sent in collectives: payload bytes and counts, by kind.

    Bytes are the payload handed to each collective (elements x element size); the wire traffic
    of a ring all-reduce is 2 (W - 1) / W times that.
    """

    bytes: int = 0
    collectives: int = 0
    largest: int = 0  # elements of the largest single tensor (one matrix's share) sent
    # largest (elements of one Dion request) / (m n of its matrix): below 1 means no collective
    # carried anything the size of a whole matrix
    largest_matrix_fraction: float = 0.0
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)

    def record(self, kind: str, elements: int, itemsize: int, largest: int = 0,
               fraction: float = 0.0) -> None:
        """One collective of ``elements`` elements of ``itemsize`` bytes each."""
        nbytes = elements * itemsize
        self.largest = max(self.largest, largest)
        self.largest_matrix_fraction = max(self.largest_matrix_fraction, fraction)
        self.bytes += nbytes
        self.collectives += 1
        entry = self.by_kind.setdefault(kind, {"bytes": 0, "collectives": 0, "elements": 0})
        entry["bytes"] += nbytes
        entry["collectives"] += 1
        entry["elements"] += elements

    def as_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "collectives": self.collectives, "largest": self.largest,
                "largest_matrix_fraction": self.largest_matrix_fraction,
                "by_kind": {k: dict(v) for k, v in self.by_kind.items()}}


class Comm:
    """Issues the optimizer's collectives and keeps the ledger of the current step."""

    def size(self, group: Any) -> int:
        """Processes in ``group`` (None: this one alone)."""
        return group_size(group)

    def _issue(self, flat: Tensor, op: Any, group: Any, kind: str, async_op: bool) -> Any:
        """The one call to torch.distributed: all-reduce ``flat`` in place; returns the work
        handle (None when not asynchronous)."""
        return dist.all_reduce(flat, op=op, group=group, async_op=async_op)

    def __init__(self) -> None:
        self.ledger = Ledger()

    def new_step(self) -> None:
        self.ledger = Ledger()

    def all_reduce_mean(self, tensors: Sequence[Tensor], group: Any, kind: str) -> None:
        """Average tensors in place across ``group``, one collective per dtype and device."""
        self.start_mean(tensors, group, kind)()

    def start_mean(self, tensors: Sequence[Tensor], group: Any,
                   kind: str) -> Callable[[], None]:
        """Start averaging ``tensors`` in place across ``group`` without waiting; returns the
        function that waits and writes the averages (calling it again does nothing)."""
        launched = self._launch(tensors, group, kind, None, async_op=True)
        done = False

        def finish() -> None:
            nonlocal done
            if not done:
                done = True
                for t, avg in zip(tensors, self._collect(launched, tensors, group, mean=True)):
                    if avg is not t:
                        t.copy_(avg)

        return finish

    def all_reduce_max(self, tensors: Sequence[Tensor], group: Any, kind: str) -> list[Tensor]:
        """The elementwise maxima across ``group`` (new tensors; the inputs stay as they are).
        A minimum is the maximum of the negation."""
        launched = self._launch(tensors, group, kind, None, async_op=False, op=dist.ReduceOp.MAX)
        return self._collect(launched, tensors, group, mean=False)

    def _launch(self, tensors: Sequence[Tensor], group: Any, kind: str,
                matrix_sizes: Sequence[int] | None, async_op: bool,
                op: Any = dist.ReduceOp.SUM) -> list[tuple]:
        """Issue one all-reduce (a sum unless ``op`` says otherwise) per (dtype, device) bucket:
        [(work, flat, indices)]."""
        if self.size(group) == 1 or not tensors:
            return []
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, t in enumerate(tensors):
            buckets[(t.dtype, t.device)].append(i)
        launched = []
        for idx in buckets.values():
            flat = torch.cat([tensors[i].reshape(-1) for i in idx])
            fraction = max(tensors[i].numel() / matrix_sizes[i] for i in idx) if matrix_sizes else 0
            self.ledger.record(kind, flat.numel(), flat.element_size(),
                               max(tensors[i].numel() for i in idx), fraction)
            # gloo has no AVG: sum here, divide in _collect.
            work = self._issue(flat, op, group, kind, async_op)
            launched.append((work, flat, idx))
        return launched

    def _collect(self, launched: list[tuple], tensors: Sequence[Tensor], group: Any,
                 mean: bool) -> list[Tensor]:
        """Wait for launched buckets; new tensors holding the sums (or means)."""
        out = list(tensors)
        for work, flat, idx in launched:
            if work is not None:
                work.wait()
            if mean:
                flat.div_(self.size(group))
            for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx])):
                out[i] = piece.view(tensors[i].shape)
        return out

    def _reduce(self, tensors: Sequence[Tensor], group: Any, kind: str, mean: bool,
                matrix_sizes: Sequence[int] | None = None) -> list[Tensor]:
        """Sum (or average) across ``group``; returns new tensors, leaving the inputs intact."""
        launched = self._launch(tensors, group, kind, matrix_sizes, async_op=False)
        return self._collect(launched, tensors, group, mean)

    def complete(self, layouts: Sequence[Any], requests: Sequence[Reduce]) -> list[Tensor]:
        """Complete each request's sums over the groups its layout assigns to its axes."""
        out = [req.tensor for req in requests]
        for axis in ("row", "col", "replica"):
            buckets: dict[tuple, tuple[Any, list[int]]] = {}
            for i, (lay, req) in enumerate(zip(layouts, requests)):
                group = lay.groups.get(axis)
                if axis in req.axes and self.size(group) > 1:
                    buckets.setdefault((id(group), req.kind), (group, []))[1].append(i)
            for (_, kind), (group, idx) in buckets.items():
                reduced = self._reduce([out[i] for i in idx], group, kind, axis == "replica",
                                       [layouts[i].m * layouts[i].n for i in idx])
                for i, t in zip(idx, reduced):
                    out[i] = t
        return out


@dataclass(frozen=True)
class Record:
    """One collective a :class:`RecordingComm` would have issued."""

    group: Any
    kind: str
    elements: int
    itemsize: int


class RecordingComm(Comm):
    """Issues nothing and records what :class:`Comm` would issue, through the same bucketing.

    ``sizes`` maps each group (any hashable label, e.g. a mesh axis name) to its number of
    processes. With shape-only (meta) tensors this is how the planner obtains the optimizer's
    collectives from the real update, for models far larger than this machine.
    """

    def __init__(self, sizes: dict[Any, int]) -> None:
        super().__init__()
        self.sizes = sizes
        self.records: list[Record] = []

    def size(self, group: Any) -> int:
        return 1 if group is None else self.sizes[group]

    def _issue(self, flat: Tensor, op: Any, group: Any, kind: str, async_op: bool) -> None:
        self.records.append(Record(group, kind, flat.numel(), flat.element_size()))
        return None
