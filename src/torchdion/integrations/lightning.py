"""Lightning: what ``configure_optimizers`` returns, Dion with a warmup-then-decay LambdaLR.

::

    import lightning as L
    from torchdion.integrations.lightning import dion_optimizers

    class Model(L.LightningModule):
        def configure_optimizers(self):
            return dion_optimizers(self, lr=0.02, adam_lr=3e-4, warmup_steps=100,
                                   total_steps=self.trainer.max_steps, head=self.head)

Lightning calls ``optimizer.step(closure)``; Dion runs the closure (forward and backward) first,
as torch's optimizers do. The scheduler steps every optimizer step (``"interval": "step"``).
Under Lightning's DDP strategy the gradients arrive averaged; Dion sends nothing for them. This
module does not import Lightning: the dict is Lightning's plain ``configure_optimizers`` format.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from ..groups import param_groups
from ..optimizer import Dion


def warmup_decay(warmup_steps: int, total_steps: int | None, min_lr_ratio: float = 0.0,
                 decay: str = "cosine") -> Callable[[int], float]:
    """LambdaLR factor: linear warmup from 1 / (warmup_steps + 1) to 1 over ``warmup_steps``, then
    ``decay`` ("cosine", "linear" or "none") to ``min_lr_ratio`` at ``total_steps``."""
    if decay not in ("cosine", "linear", "none"):
        raise ValueError(f"decay must be 'cosine', 'linear' or 'none', got {decay!r}")
    if decay != "none" and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError(f"total_steps must exceed warmup_steps ({warmup_steps}) to decay, "
                         f"got {total_steps!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if decay == "none":
            return 1.0
        assert total_steps is not None
        t = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * t)) if decay == "cosine" else 1 - t
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return factor


def dion_optimizers(
    module: nn.Module,
    *,
    lr: float = 0.02,
    adam_lr: float = 3e-4,
    weight_decay: float = 0.01,
    rank_fraction: float = 1.0,
    head: nn.Module | Tensor | Iterable[Tensor] | None = None,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
    decay: str = "cosine",
    **dion: Any,
) -> dict[str, Any]:
    """``{"optimizer": Dion, "lr_scheduler": {...}}`` for ``configure_optimizers``.

    Groups by :func:`torchdion.param_groups`: hidden matrices Dion at ``lr`` (``rank_fraction``
    and the ``dion`` overrides), embeddings, ``head``, norms and biases AdamW at ``adam_lr``.
    The schedule is :func:`warmup_decay`; ``decay="none"`` with ``total_steps=None`` keeps the
    rate after warmup.
    """
    groups = param_groups(module, head=head,
                          dion={"lr": lr, "rank_fraction": rank_fraction, **dion},
                          embedding={"lr": adam_lr}, other={"lr": adam_lr})
    optimizer = Dion(groups, lr=lr, weight_decay=weight_decay)
    schedule = LambdaLR(optimizer, warmup_decay(warmup_steps, total_steps, min_lr_ratio, decay))
    return {"optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1}}
