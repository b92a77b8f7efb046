"""Where a parameter's canonical matrix lives: its global shape, orientation and local block."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


def matrix_shape(shape: tuple[int, ...], flatten: bool, name: str) -> tuple[int, int]:
    """The (m, n) = (fan_out, fan_in) matrix a Dion parameter is treated as."""
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) > 2 and flatten:
        return shape[0], math.prod(shape[1:])
    if len(shape) > 2:
        raise ValueError(
            f"Dion parameter {name} has shape {tuple(shape)}: more than 2 dims. Set flatten=True "
            "in its parameter group to treat (out, in, *k) as (out, in * prod(k)), or give it "
            "algorithm='adamw'."
        )
    raise ValueError(
        f"Dion parameter {name} has shape {tuple(shape)}: Dion needs a matrix. Put it in a "
        "group with algorithm='adamw' or 'lion' (torchdion.param_groups does this)."
    )


@dataclass(frozen=True)
class Layout:
    """A Dion matrix's place in the canonical orientation A (a, b), a >= b.

    ``transposed``: A is X^T. ``rows`` / ``cols``: this process's block of A, as [start, stop).
    ``groups``: the process group completing each axis of :mod:`torchdion.reduce`, or None
    where the axis is not split (one device).
    """

    m: int
    n: int
    transposed: bool
    rows: tuple[int, int]
    cols: tuple[int, int]
    groups: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def a(self) -> int:
        return max(self.m, self.n)

    @property
    def b(self) -> int:
        return min(self.m, self.n)

    @property
    def row_slice(self) -> slice:
        return slice(*self.rows)

    @property
    def col_slice(self) -> slice:
        return slice(*self.cols)

    def canonical(self, local: Tensor) -> Tensor:
        """The local block of A, as a view of the local 2-D block of X."""
        return local.mT if self.transposed else local


def single_device_layout(m: int, n: int) -> Layout:
    transposed = m < n
    a, b = max(m, n), min(m, n)
    return Layout(m, n, transposed, (0, a), (0, b))
