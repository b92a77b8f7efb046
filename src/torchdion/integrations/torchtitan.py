"""torchtitan: Dion as an optimizer of ``OptimizersContainer``, groups chosen by name pattern.

torchtitan's trainer builds its optimizers with ``config.optimizer.build(model_parts=...)``;
:func:`dion_optimizer_config` returns a config whose ``build`` makes a
:class:`DionOptimizersContainer`, which knows the optimizer name ``"Dion"`` besides torchtitan's
own ("AdamW", ...). Everything else (``init_optim_state``, the flat FQN-keyed state dict that DCP
saves, LR schedulers, step hooks) is torchtitan's, unchanged::

    from torchdion.integrations.torchtitan import dion_optimizer_config

    config.optimizer = dion_optimizer_config(lr=0.02, adam_lr=3e-4, rank_fraction=0.25)

torchtitan shards with FSDP2 and TP, whose DTensor placements Dion reads; gradients arrive
reduced over the data-parallel replicas (``gradients_synchronized``), so Dion adds no
data-parallel traffic of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig

from ..optimizer import Dion

# Parameter-name patterns, first match wins (torchtitan's rule). They match the names in
# torchtitan's models (llama3, qwen3, deepseek_v3, ...) and Hugging Face's.
EMBEDDINGS = r"(^|\.)(tok_embeddings|embed_tokens|wte|wpe)\."
OUTPUT = r"(^|\.)(output|lm_head)\."
NORMS = r"norm"
BIASES = r"\.bias$"
# Stacked expert weights (num_experts, out, in) of torchtitan's MoE; not shared experts.
EXPERTS = r"(^|\.)experts\."


@dataclass(kw_only=True, slots=True)
class OptionalParamGroupConfig(ParamGroupConfig):
    """A group left out of a model part where it matches no parameter, where torchtitan would
    raise: one list of defaults then fits models with and without biases, experts, or (under
    pipeline parallelism) the embedding on this stage."""


class DionOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` with ``"Dion"`` among its optimizer names.

    Groups of the same optimizer name become one optimizer per model part, so all ``"Dion"``
    groups (hidden matrices and the element-wise AdamW groups alike) are one :class:`Dion`.
    Constructor-only arguments (``seed``, ``replicate_group``, ...) go in
    ``optimizer_factory_kwargs_by_name["Dion"]``.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        # torchtitan's default, "fused", sets fused=True in every group: Dion has no fused kernel
        implementation: Literal["for-loop", "foreach", "fused", "fused_opt_states_bf16"] = (
            "for-loop")

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Any:
        if name == "Dion":
            return Dion
        return OptimizersContainer._resolve_optimizer_factory(name)

    @staticmethod
    def _build_param_groups(model: nn.Module, param_group_configs: list[ParamGroupConfig],
                            impl_kwargs: dict[str, Any]) -> Any:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        claimed: set[str] = set()  # first match wins, as in torchtitan
        kept = []
        for pg in param_group_configs:
            pattern = re.compile(pg.pattern)
            matched = {n for n in names if n not in claimed and pattern.search(n)}
            claimed |= matched
            if matched or not isinstance(pg, OptionalParamGroupConfig):
                kept.append(pg)
        return OptimizersContainer._build_param_groups(model, kept, impl_kwargs)


def dion_param_groups(
    *,
    lr: float = 0.02,
    adam_lr: float = 3e-4,
    weight_decay: float = 0.1,
    elementwise: str = "adamw",
    dion: dict[str, Any] | None = None,
    experts: dict[str, Any] | None = None,
) -> list[ParamGroupConfig]:
    """Name-pattern groups for one Dion: embeddings, output head, norms and biases element-wise
    (``elementwise``, at ``adam_lr``), stacked experts Dion with ``stacked=True`` (each expert
    its own matrix; ``experts`` overrides, e.g. ``{"algorithm": "adamw", "stacked": False}``),
    every other parameter (the hidden matrices) Dion at ``lr`` with the ``dion`` overrides
    (``rank_fraction``, ...), which the experts share."""
    side = {"algorithm": elementwise, "lr": adam_lr, "weight_decay": weight_decay}
    matrices = {"algorithm": "dion", "lr": lr, "weight_decay": weight_decay, **(dion or {})}
    patterns = [
        (EMBEDDINGS, side), (OUTPUT, side), (NORMS, side), (BIASES, side),
        (EXPERTS, {**matrices, "stacked": True, **(experts or {})}),
        (r".*", matrices),
    ]
    return [OptionalParamGroupConfig(pattern=p, optimizer_name="Dion", optimizer_kwargs=dict(kw))
            for p, kw in patterns]


def dion_optimizer_config(
    *,
    lr: float = 0.02,
    adam_lr: float = 3e-4,
    weight_decay: float = 0.1,
    rank_fraction: float = 1.0,
    elementwise: str = "adamw",
    experts: dict[str, Any] | None = None,
    seed: int = 0,
    **dion: Any,
) -> DionOptimizersContainer.Config:
    """A torchtitan optimizer config for Dion with :func:`dion_param_groups`.

    ``dion`` holds further Dion hyperparameters of the hidden-matrix group (``mu``,
    ``orthonormalize``, ...). Groups that match nothing in a model part are left out. For other
    groups, build ``DionOptimizersContainer.Config(param_groups=[...])`` with your own
    ``ParamGroupConfig(pattern=..., optimizer_name="Dion", optimizer_kwargs={...})`` entries
    (any of torchtitan's optimizer names can stand beside them).
    """
    groups = dion_param_groups(lr=lr, adam_lr=adam_lr, weight_decay=weight_decay,
                               elementwise=elementwise, experts=experts,
                               dion={"rank_fraction": rank_fraction, **dion})
    return DionOptimizersContainer.Config(
        param_groups=groups, optimizer_factory_kwargs_by_name={"Dion": {"seed": seed}})
