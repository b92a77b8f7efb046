"""Parameter groups from a model: Dion for hidden matrices, an element-wise rule for the rest."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn


def param_groups(
    model: nn.Module,
    *,
    head: nn.Module | Tensor | Iterable[Tensor] | None = None,
    elementwise: str = "adamw",
    dion: dict[str, Any] | None = None,
    embedding: dict[str, Any] | None = None,
    other: dict[str, Any] | None = None,
    flatten: bool = False,
    stacked: str | Iterable[str] | Callable[[str, Tensor], bool] | None = None,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into Dion and element-wise groups.

    Rules, in order:

    1. weights of ``nn.Embedding`` modules, and of ``head`` (the output projection; pass the module
       or its weight), go to the ``embedding`` group with the element-wise algorithm. A head tied
       to an embedding is the same tensor and is listed once;
    2. parameters named by ``stacked`` (a glob pattern on the name from ``named_parameters``,
       e.g. ``"*.experts.*"``, a list of them, or a predicate ``(name, param) -> bool``) with 2
       dims or more go to a Dion group with ``stacked=True``: their leading dims index
       independent matrices (the experts of a mixture-of-experts layer), each updated as its own
       Dion matrix;
    3. other non-empty parameters with 2 dims (or more, with ``flatten=True``) go to the Dion
       group;
    4. everything else (norm weights, biases, scalars, >2-D tensors without flatten) goes to the
       ``other`` group with the element-wise algorithm.

    ``dion`` (for both Dion groups), ``embedding`` and ``other`` hold per-group hyperparameter
    overrides (lr, ...). Empty groups are left out.
    """
    if elementwise not in ("adamw", "lion"):
        raise ValueError(f"elementwise must be 'adamw' or 'lion', got {elementwise!r}")
    special: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            special.add(id(module.weight))
    if isinstance(head, nn.Module):
        special.update(id(p) for p in head.parameters())
    elif isinstance(head, Tensor):
        special.add(id(head))
    elif head is not None:
        special.update(id(p) for p in head)

    is_stacked = _name_matcher(stacked)
    matrices, stacks, embeddings, rest = [], [], [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():  # lists a tied tensor once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in special:
            embeddings.append(p)
        elif p.ndim >= 2 and p.numel() > 0 and is_stacked(name, p):
            stacks.append(p)
        elif (p.ndim == 2 or (p.ndim > 2 and flatten)) and p.numel() > 0:
            matrices.append(p)
        else:
            rest.append(p)

    # the overrides win, so e.g. other=dict(algorithm="lion") works beside AdamW embeddings
    groups = [
        {"params": matrices, "algorithm": "dion", "flatten": flatten, **(dion or {})},
        {"params": stacks, "algorithm": "dion", "stacked": True, **(dion or {})},
        {"params": embeddings, "algorithm": elementwise, **(embedding or {})},
        {"params": rest, "algorithm": elementwise, **(other or {})},
    ]
    return [g for g in groups if g["params"]]


def _name_matcher(
    stacked: str | Iterable[str] | Callable[[str, Tensor], bool] | None,
) -> Callable[[str, Tensor], bool]:
    if stacked is None:
        return lambda name, p: False
    if callable(stacked):
        return stacked
    patterns = [stacked] if isinstance(stacked, str) else list(stacked)
    if not all(isinstance(pat, str) for pat in patterns):
        raise ValueError(f"stacked must be a glob pattern, a list of them or a predicate "
                         f"(name, param) -> bool, got {stacked!r}")
    return lambda name, p: any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def warn_embeddings_in_dion(model: nn.Module, groups: Iterable[dict[str, Any]]) -> None:
    """Warn when a weight owned by ``nn.Embedding`` sits in a Dion group."""
    owned = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for group in groups:
        if group.get("algorithm", "dion") != "dion":
            continue
        params = group["params"]
        for p in [params] if isinstance(params, Tensor) else params:
            if id(p) in owned:
                warnings.warn(
                    f"the weight of nn.Embedding {owned[id(p)]!r} is in a Dion group; embeddings "
                    "usually train better with AdamW (see torchdion.param_groups)",
                    stacklevel=2,
                )
