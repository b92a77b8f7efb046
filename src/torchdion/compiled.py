"""``Dion(compile=True)``: a batch's whole update as one torch.compile graph, where it can be.

A batch whose layout completes no sum across processes (one device, or expert parallelism
alone) has nothing to wait for between its products, factorizations and masks: every
:class:`~torchdion.reduce.Reduce` it yields is already complete. There the whole
``dion_update`` (or ``dion2_update``), driven by :func:`~torchdion.reduce.run_lockstep`, is
compiled with ``fullgraph=True``: one graph per batch, or an error, never a silent break into
pieces. Batches whose sums cross processes run eagerly, since their collectives are issued
between the pieces (bucketed over every matrix of the step).

Each distinct batch (count, shape, rank, dtype, options) is compiled once, on its first step;
past :data:`RECOMPILE_LIMIT` distinct batches torch runs the rest eagerly and warns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .reduce import run_lockstep


def run_alone(update: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``update(*args, **kwargs)`` driven to its end with every sum already complete."""
    return run_lockstep([update(*args, **kwargs)], [None])[0]


# Distinct batches a step may compile (torch's default limit per function is 8: a model with
# more matrix shapes, ranks or dtypes would silently run the rest eagerly).
RECOMPILE_LIMIT = 64
_compiled: Callable[..., Any] | None = None


def run_alone_compiled(update: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """:func:`run_alone` under torch.compile, built on first use (importing torchdion stays
    free of torch._dynamo). Shapes are specialized (``dynamic=False``): each batch gets
    kernels for its own sizes, as the eager step does."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(run_alone, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        return _compiled(update, *args, **kwargs)
