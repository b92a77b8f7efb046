"""Hugging Face transformers: ``(Dion, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

``Trainer`` builds its optimizer as ``cls(params, **kwargs)`` and takes ``params`` from kwargs
when they hold it; its own groups would only split by weight decay, putting the embeddings and
the tied ``lm_head`` in Dion. :func:`dion_for_trainer` groups by role instead::

    from torchdion.integrations.transformers import dion_for_trainer

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=dion_for_trainer(model, lr=0.02, adam_lr=3e-4))

The learning rates come from here, not from ``args.learning_rate``; ``Trainer``'s scheduler
(``args.lr_scheduler_type``, warmup) scales every group's rate. Under ``Trainer``'s DDP the
gradients arrive averaged, and Dion sends nothing for them itself.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..groups import param_groups
from ..optimizer import Dion
from ..update import lr_scale_factor
from ..validation import fill_algorithm_defaults


def _role_weights(model: nn.Module) -> list[Tensor]:
    """Input and output embedding weights, through the model's own accessors (HF models do not
    all use nn.Embedding, and a tied lm_head is the input embedding's tensor)."""
    weights = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and isinstance(getattr(module, "weight", None), Tensor):
            weights.append(module.weight)
    return weights


def dion_for_trainer(
    model: nn.Module,
    *,
    lr: float = 0.02,
    adam_lr: float = 3e-4,
    weight_decay: float = 0.0,
    rank_fraction: float = 1.0,
    elementwise: str = "adamw",
    **dion: Any,
) -> tuple[type[Dion], dict[str, Any]]:
    """``(Dion, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    Groups (see :func:`torchdion.param_groups`): the input embeddings and the output head (tied
    or not) element-wise at ``adam_lr``; hidden matrices Dion at ``lr`` with ``rank_fraction``
    and the ``dion`` overrides; norms and biases element-wise at ``adam_lr`` without weight
    decay (as ``Trainer`` does). ``weight_decay`` is decoupled, times the group's lr.

    GPT-2-style ``Conv1D`` layers store their weight as (in, out), the transpose of
    ``nn.Linear``'s; under a shape-dependent ``lr_scale`` (Dion's default "muon", or
    "spectral") each such shape gets its own group whose lr is multiplied by
    scale(out, in) / scale(in, out) (and weight decay divided by it), so that its step equals
    the one of the same ``nn.Linear``.
    """
    hidden = {"lr": lr, "weight_decay": weight_decay, "rank_fraction": rank_fraction, **dion}
    groups = param_groups(
        model, head=_role_weights(model), elementwise=elementwise, dion=hidden,
        embedding={"lr": adam_lr, "weight_decay": weight_decay},
        other={"lr": adam_lr, "weight_decay": 0.0})
    kind = fill_algorithm_defaults({"algorithm": "dion", "lr_scale": hidden.get("lr_scale")})
    groups = _conv1d_groups(model, groups, kind["lr_scale"])
    return Dion, {"params": groups, "lr": lr, "weight_decay": weight_decay}


def _conv1d_groups(model: nn.Module, groups: list[dict[str, Any]],
                   lr_scale: str) -> list[dict[str, Any]]:
    # the scale reads shape (out, in); for (in, out) storage the wanted scale(out, in) is the
    # read scale(in, out) times their ratio; lr * weight_decay stays as it was
    stored_in_out = {id(m.weight) for m in model.modules() if isinstance(m, Conv1D)}
    result = []
    for group in groups:
        if group["algorithm"] != "dion":
            result.append(group)
            continue
        rest: list[Tensor] = []
        by_shape: dict[tuple[int, ...], list[Tensor]] = {}
        for p in group["params"]:
            if id(p) in stored_in_out:
                by_shape.setdefault(tuple(p.shape), []).append(p)
            else:
                rest.append(p)
        if rest:
            result.append({**group, "params": rest})
        for (fan_in, fan_out), params in by_shape.items():
            ratio = (lr_scale_factor(lr_scale, fan_out, fan_in)
                     / lr_scale_factor(lr_scale, fan_in, fan_out))
            result.append({**group, "params": params, "lr": group["lr"] * ratio,
                           "weight_decay": group["weight_decay"] / ratio})
    return result
