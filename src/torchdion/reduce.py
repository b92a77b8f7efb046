"""The one request the math makes of a layout: complete a partial sum.

The per-matrix math (``update.py``, ``orthonormalize.py``) is written over local blocks as
generators. Wherever a quantity is a sum over a dimension that a layout may split across
processes, the math yields ``Reduce(partial, axes)`` and continues with the completed tensor that
the driver sends back. The driver runs every matrix's generator in lockstep, so the requests of
one round are bucketed into a few collectives whatever the number of matrices.

Axes:
  "row"     the long side of the canonical orientation, summed across its shards;
  "col"     the short side, summed across its shards;
  "replica" data-parallel replicas, averaged (each replica holds its own batch's mean gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

AXES = ("row", "col", "replica")


@dataclass(frozen=True)
class Reduce:
    tensor: Tensor
    axes: tuple[str, ...]
    kind: str  # what the sum is, for the communication ledger ("P", "R", "gram", ...)


Complete = Callable[[Sequence[Any], Sequence[Reduce]], Sequence[Tensor]]


def any_true(flags: Tensor) -> bool:
    """Whether any of ``flags`` is set, for the math's data-dependent branches (the Cholesky
    fallback, a non-finite value, a vanished momentum).

    The shape-only path: meta tensors (the planner's) hold no data, and there the answer is
    False, the branch of a healthy step, so a shape-only run makes exactly the requests a real
    step makes when no fallback is needed.
    """
    return not flags.is_meta and bool(flags.any())


def local_complete(layouts: Sequence[Any], requests: Sequence[Reduce]) -> list[Tensor]:
    """One device: every sum is already complete."""
    return [req.tensor for req in requests]


def run_lockstep(
    gens: Sequence[Generator[Reduce, Tensor, Any]],
    layouts: Sequence[Any],
    complete: Complete = local_complete,
) -> list[Any]:
    """Drive generators together; each round's requests go to ``complete`` in one call."""
    results: list[Any] = [None] * len(gens)
    pending: dict[int, Reduce] = {}

    def advance(i: int, value: Tensor | None) -> None:
        try:
            pending[i] = gens[i].send(value)  # type: ignore[arg-type]  # None starts it
        except StopIteration as stop:
            results[i] = stop.value

    for i in range(len(gens)):
        advance(i, None)
    while pending:
        idx = sorted(pending)
        answers = complete([layouts[i] for i in idx], [pending.pop(i) for i in idx])
        for i, ans in zip(idx, answers):
            advance(i, ans)
    return results
