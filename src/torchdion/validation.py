"""What a valid parameter group is, checked before anything is written, and parameter names.

One table, :data:`CHECKS`, says what every hyperparameter must be. The optimizer runs it at
construction, in ``add_param_group``, on a state dict's groups before loading them, and at the
start of every step (schedulers and users change ``param_groups`` between steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .orthonormalize import METHODS

# Defaults that depend on the group's algorithm, for the keys the constructor leaves None. Dion's
# are the options that won the quality benchmark at every rank, by more than the seeds' spread
# at 300 steps and again at 1200 (docs/benchmarks.md, "Quality options"); Dion2 and Muon keep
# plain momentum and the spectral scale (what they were measured with).
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {"nesterov": {"dion": True},
                                                 "lr_scale": {"dion": "muon"}}
OTHER_DEFAULTS: dict[str, Any] = {"nesterov": False, "lr_scale": "spectral"}
# Algorithms that treat a parameter as a matrix (a MatrixPlan each); the rest are element-wise.
MATRIX_ALGORITHMS = ("dion", "dion2", "muon")
ALGORITHMS = (*MATRIX_ALGORITHMS, "adamw", "lion")
LR_SCALES = ("spectral", "muon", "rms", "none")
MATMUL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Keys LR schedulers and torch itself add to groups; accepted, never required.
FOREIGN_KEYS = frozenset({"params", "initial_lr", "name", "param_names"})
# Implementation switches of torch's optimizers, which frameworks (torchtitan, ...) put into every
# group. Dion has one implementation, so False or None ("the default") is accepted and ignored;
# True asks for something Dion does not do, and raises with the reason.
FRAMEWORK_FLAGS = {
    "fused": "Dion has no fused kernel (torchtitan: implementation='for-loop')",
    "foreach": "Dion batches its tensors itself and has no foreach switch "
               "(torchtitan: implementation='for-loop')",
    "capturable": "Dion's step is not CUDA-graph capturable",
    "differentiable": "Dion's step runs under no_grad and is not differentiable",
    "maximize": "Dion only minimizes; negate the loss instead",
}
# The group keys a Dion matrix's plan is made from (torchdion.matrix_plan.plan_matrix).
PLAN_KEYS = ("algorithm", "flatten", "stacked", "rank_fraction", "rank_multiple_of",
             "orthonormalize")
# The state each algorithm keeps per parameter (once the parameter has state at all).
STATE_KEYS = {
    "dion": frozenset({"step", "momentum", "Q"}),
    "dion2": frozenset({"step", "momentum"}),
    "muon": frozenset({"step", "momentum"}),
    "adamw": frozenset({"step", "exp_avg", "exp_avg_sq"}),
    "lion": frozenset({"step", "exp_avg"}),
}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_lr(lr: Any) -> bool:
    # float() of a tensor of several elements raises, and an infinite one is no learning rate
    if isinstance(lr, Tensor):
        return (lr.numel() == 1 and lr.dtype != torch.bool and not lr.is_complex()
                and math.isfinite(float(lr)) and float(lr) >= 0)
    return _is_number(lr) and lr >= 0


# name -> (test, what the value must be)
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (_is_lr, "a finite number >= 0"),
    "mu": (lambda x: _is_number(x) and 0 <= x < 1, "in [0, 1)"),
    "rank_fraction": (lambda x: _is_number(x) and 0 < x <= 1, "in (0, 1]"),
    "rank_multiple_of": (lambda x: _is_int(x, 1), "an int >= 1"),
    "weight_decay": (lambda x: _is_number(x) and x >= 0, "a finite number >= 0"),
    "betas": (lambda x: isinstance(x, (tuple, list)) and len(x) == 2
              and all(_is_number(b) and 0 <= b < 1 for b in x), "two numbers in [0, 1)"),
    "eps": (lambda x: _is_number(x) and x >= 0, "a finite number >= 0"),
    "power_iters": (lambda x: _is_int(x, 1), "an int >= 1"),
    "orthonormalize": (lambda x: x in METHODS, f"one of {METHODS}"),
    "lr_scale": (lambda x: x is None or x in LR_SCALES,
                 f"one of {LR_SCALES} or None (the algorithm's default)"),
    "algorithm": (lambda x: x in ALGORITHMS, f"one of {ALGORITHMS}"),
    "flatten": (lambda x: isinstance(x, bool), "a bool"),
    "stacked": (lambda x: isinstance(x, bool), "a bool"),
    "state_dtype": (lambda x: x is None or (isinstance(x, torch.dtype) and x.is_floating_point),
                    "None or a floating torch.dtype"),
    "matmul_dtype": (lambda x: x is None or x in MATMUL_DTYPES,
                     "None, torch.bfloat16, torch.float16 or torch.float32"),
    "ns_steps": (lambda x: _is_int(x, 1), "an int >= 1"),
    "nesterov": (lambda x: x is None or isinstance(x, bool),
                 "a bool or None (the algorithm's default)"),
    "polar_q": (lambda x: isinstance(x, bool), "a bool"),
    "direction_tol": (lambda x: _is_number(x) and 0 <= x < 1, "a number in [0, 1)"),
}


def fill_algorithm_defaults(group: dict[str, Any]) -> dict[str, Any]:
    """Set every key of :data:`ALGORITHM_DEFAULTS` that is None in ``group`` to the default of
    the group's algorithm, in place (and return ``group``). Idempotent; a group's stored values
    are never None once added, and a None set between steps is filled at the next step."""
    for key, by_algorithm in ALGORITHM_DEFAULTS.items():
        if group.get(key) is None:
            group[key] = by_algorithm.get(group.get("algorithm", ""), OTHER_DEFAULTS[key])
    return group


def check(name: str, ok: bool, expected: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def validate_hyperparameters(group: dict[str, Any], where: str = "") -> None:
    """Raise ValueError naming the first invalid hyperparameter of a group or of the defaults
    (``where`` prefixes the name, e.g. ``"param_groups[1]."``)."""
    for name, (test, expected) in CHECKS.items():
        if name not in group:
            raise ValueError(f"{where}{name} is missing")
        value = group[name]
        try:
            ok = bool(test(value))
        except (TypeError, ValueError, RuntimeError):
            ok = False
        check(where + name, ok, expected, value)


def check_framework_flags(group: dict[str, Any], where: str = "") -> None:
    """Raise ValueError for a framework flag (``fused``, ``foreach``, ...) not False or None."""
    for key, why in FRAMEWORK_FLAGS.items():
        value = group.get(key)
        if value is not None and value is not False:
            raise ValueError(f"{where}{key} must be False or None, got {value!r}: {why}")


def check_group_keys(group: dict[str, Any], known: Iterable[str], where: str) -> None:
    """Raise ValueError for keys that are neither hyperparameters nor keys torch or frameworks
    add, and for a framework flag asking for what Dion does not do."""
    check_framework_flags(group, where)
    known = set(known)
    unknown = set(group) - known - FOREIGN_KEYS - set(FRAMEWORK_FLAGS)
    if unknown:
        place = where.rstrip(". ") + ": " if where else ""
        raise ValueError(f"{place}unknown parameter group key(s) {sorted(unknown)}; known keys: "
                         f"{sorted(known)}")


def parameter_name(param_groups: list[dict[str, Any]], p: Tensor) -> str:
    """A parameter's name for messages: its ``param_names`` entry when groups carry them, else
    its place in ``param_groups``; with its shape."""
    for gi, group in enumerate(param_groups):
        for i, q in enumerate(group["params"]):
            if q is p:
                if "param_names" in group:
                    return f"{group['param_names'][i]!r} (shape {tuple(p.shape)})"
                return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"
    return f"parameter of shape {tuple(p.shape)}"


def parameter_names(param_groups: list[dict[str, Any]]) -> list[str]:
    """:func:`parameter_name` of every parameter, in order, in one pass."""
    out = []
    for gi, group in enumerate(param_groups):
        for i, p in enumerate(group["params"]):
            if "param_names" in group:
                out.append(f"{group['param_names'][i]!r} (shape {tuple(p.shape)})")
            else:
                out.append(f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})")
    return out


def check_scalars_fit(lr: float, scale: float, weight_decay: float, p: Tensor, where: str,
                      name_of: Callable[[Tensor], str]) -> None:
    """The step's scalars (lr times the update's scale, lr times weight decay) must be finite in
    the dtype the step computes in; a huge but finite lr would otherwise fail mid-write."""
    compute = torch.float64 if p.dtype == torch.float64 else torch.float32
    if max(lr * scale, lr * weight_decay) > torch.finfo(compute).max:
        raise ValueError(f"{where}lr={lr!r} overflows {compute} in the update of parameter "
                         f"{name_of(p)}")
