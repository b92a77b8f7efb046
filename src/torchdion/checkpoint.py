"""Whether a state dict can be loaded into an optimizer, decided before anything is changed.

torch's ``Optimizer.load_state_dict`` replaces the groups' hyperparameters first and meets a bad
state entry only at the next step. :func:`check_loadable` looks at everything a load would bring
in (the structure, every group's keys and values, every state entry's keys, types and shapes) and
raises ValueError naming the group or parameter and key, so that a load either applies whole or
not at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from .matrix_plan import MatrixPlan
from .validation import STATE_KEYS, check_group_keys, validate_hyperparameters


def _tensor_keys(algorithm: str) -> list[str]:
    # parameter-shaped state first: its shape says more than Q's about a mismatch
    return sorted(STATE_KEYS[algorithm] - {"step"}, key=lambda k: (k == "Q", k))


def check_loadable(
    state_dict: Any,
    param_groups: list[dict[str, Any]],
    known_keys: set[str],
    plan_of: Callable[[Tensor, dict[str, Any]], MatrixPlan],
    name_of: Callable[[Tensor], str],
) -> dict[str, Any]:
    """Raise ValueError unless ``state_dict`` loads whole into an optimizer with
    ``param_groups``; return it with each group completed from this optimizer's own group (keys a
    checkpoint predates keep this optimizer's values).

    Rules: the same number of groups and of parameters per group; no unknown group keys; valid
    hyperparameters; the same ``algorithm``, ``flatten`` and ``stacked`` (the state is that
    algorithm's, of matrices of that shape);
    each parameter's state empty or exactly the algorithm's keys, ``step`` an int >= 0, tensors
    floating with the parameter's shape (Q: (*batch, min(m, n), r) of this optimizer's rank).
    """
    if not (isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict)
            and isinstance(state_dict.get("param_groups"), list)):
        raise ValueError("state_dict must be a dict with 'state' (a dict) and 'param_groups' (a "
                         "list), as Optimizer.state_dict() returns")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} parameter groups, this "
                         f"optimizer has {len(param_groups)}")
    saved_state = state_dict["state"]
    completed = []
    for gi, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        where = f"state_dict param_groups[{gi}]"
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise ValueError(f"{where} must be a dict with a 'params' list")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{where} has {len(saved['params'])} parameters, this optimizer's "
                             f"has {len(group['params'])}")
        check_group_keys(saved, known_keys, where + ".")
        # torch would load these with the other hyperparameters, and the state would then not
        # be the state of the algorithm that steps it
        for name in ("algorithm", "flatten", "stacked"):
            if name in saved and saved[name] != group[name]:
                raise ValueError(f"{where} has {name}={saved[name]!r}, this optimizer's has "
                                 f"{group[name]!r}")
        merged = {**{k: v for k, v in group.items() if k != "params"}, **saved}
        validate_hyperparameters(merged, where + ".")
        completed.append(merged)
        for key, p in zip(saved["params"], group["params"]):
            _check_state(saved_state.get(key), p, group, plan_of, name_of)
    return {**state_dict, "param_groups": completed}


def _check_state(state: Any, p: Tensor, group: dict[str, Any],
                 plan_of: Callable[[Tensor, dict[str, Any]], MatrixPlan],
                 name_of: Callable[[Tensor], str]) -> None:
    if state is None or (isinstance(state, dict) and not state):
        return  # no state yet: it is made at the parameter's first step
    where = f"state_dict state of parameter {name_of(p)}"
    if not isinstance(state, dict):
        raise ValueError(f"{where} must be a dict, got {type(state).__name__}")
    expected = STATE_KEYS[group["algorithm"]]
    if set(state) != expected:
        raise ValueError(
            f"{where} has keys {sorted(state)}, expected {sorted(expected)} (the state of "
            f"algorithm={group['algorithm']!r}; is it another optimizer's state dict?)")
    step = state["step"]
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise ValueError(f"{where}: step must be an int >= 0, got {step!r}")
    for name in _tensor_keys(group["algorithm"]):
        value = state[name]
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise ValueError(f"{where}: {name} must be a floating-point tensor, got "
                             f"{type(value).__name__}"
                             + (f" of {value.dtype}" if isinstance(value, Tensor) else ""))
        if name == "Q":
            plan = plan_of(p, group)
            if tuple(value.shape) != plan.q_global_shape:
                raise ValueError(
                    f"state_dict Q of parameter {name_of(p)} has shape {tuple(value.shape)}, "
                    f"expected {plan.q_global_shape}: the checkpoint was saved with another "
                    "rank_fraction / rank_multiple_of; load it with the same ones")
        elif tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"state_dict {name} of parameter {name_of(p)} has shape "
                             f"{tuple(value.shape)}, expected {tuple(p.shape)}")
