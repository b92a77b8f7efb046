"""The one request the math makes of a layout: complete a partial sum.

The per-matrix math (``update.py``, ``orthonormalize.py``) is written over local blocks as
generators. Wherever a quantity is a sum over a dimension that a layout may split across
processes, the math yields ``Reduce(partial, axes)`` and continues with the completed tensor that
the driver sends back. The driver runs every matrix's generator in lockstep, so the requests of
one round are bucketed into a few collectives whatever the number of matrices.

A step calls another such generator by yielding it (``P = yield orthonormalize(P, ...)``): the
driver runs it in the caller's place, its requests going out like the caller's, and sends back
its return value. This is ``yield from`` done by the driver, because torch.compile cannot trace
a value sent into a ``yield from`` (it can trace this driver: see :mod:`torchdion.compiled`).

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
# What a step yields: a request, or a generator to run in its place (sent back: its answer).
Yielded = Reduce | Generator[Any, Any, Any]


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
    gens: Sequence[Generator[Any, Any, Any]],
    layouts: Sequence[Any],
    complete: Complete = local_complete,
) -> list[Any]:
    """Drive generators together; each round's requests go to ``complete`` in one call.

    A generator may yield a :class:`Reduce` (answered with the completed tensor) or another
    generator (run in its place; answered with its return value)."""
    results: list[Any] = [None] * len(gens)
    calls = [[g] for g in gens]  # per matrix: the generator and those it is inside of
    pending: dict[int, Reduce] = {}

    def advance(i: int, value: Any) -> None:
        stack = calls[i]
        while True:
            try:
                out = stack[-1].send(value)  # None starts a generator
            except StopIteration as stop:
                stack.pop()
                # args, not .value: torch.compile traces the former
                value = stop.args[0] if stop.args else None
                if not stack:
                    results[i] = value
                    return
                continue
            if isinstance(out, Reduce):
                pending[i] = out
                return
            stack.append(out)
            value = None

    for i in range(len(gens)):
        advance(i, None)
    while pending:
        idx = sorted(pending)
        answers = complete([layouts[i] for i in idx], [pending.pop(i) for i in idx])
        for i, ans in zip(idx, answers):
            advance(i, ans)
    return results
