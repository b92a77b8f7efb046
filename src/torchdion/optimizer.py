"""The Dion optimizer: parameter groups, state, and the phases of a step."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.optim import Optimizer

from . import elementwise
from .comm import Comm, group_size
from .layout import local_tensor, q_state, shards_of
from .masks import finite_in, masked_copy_
from .matrix_plan import MatrixPlan, plan_matrix
from .orthogonalize import METHODS, sketch_matrix
from .reduce import run_lockstep
from .update import (
    DionStep,
    Workspace,
    accumulate,
    dion_update,
    direction_tolerance,
    initial_q,
    lr_scale_factor,
)

ALGORITHMS = ("dion", "adamw", "lion")
LR_SCALES = ("spectral", "rms", "none")
MATMUL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Keys LR schedulers and torch itself add to groups; accepted, never required.
_FOREIGN_KEYS = frozenset({"params", "initial_lr", "name", "param_names"})
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


class BatchKey(NamedTuple):
    """Dion matrices step together (stacked) when all of these are equal."""

    group: int  # index into param_groups: its hyperparameters
    plan: MatrixPlan  # shapes, block, rank and process groups
    device: torch.device
    dtype: torch.dtype
    step: int  # the randomized sketch is drawn per step


def _check(name: str, ok: bool, expected: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_framework_flags(group: dict[str, Any], where: str = "") -> None:
    """Raise ValueError for a framework flag (``fused``, ``foreach``, ...) not False or None."""
    for key, why in FRAMEWORK_FLAGS.items():
        value = group.get(key)
        if value is not None and value is not False:
            raise ValueError(f"{where}{key} must be False or None, got {value!r}: {why}")


def validate_hyperparameters(group: dict[str, Any], where: str = "") -> None:
    """Raise ValueError naming the first invalid hyperparameter of a group or of the defaults."""
    p = f"{where}" if where else ""
    lr = group["lr"]
    # float() of a tensor of several elements raises, and an infinite one is no learning rate
    tensor_lr = (isinstance(lr, Tensor) and lr.numel() == 1 and lr.dtype != torch.bool
                 and not lr.is_complex() and math.isfinite(float(lr)))
    _check(p + "lr", (_is_number(lr) or tensor_lr) and float(lr) >= 0,
           "a finite number >= 0", lr)
    _check(p + "mu", _is_number(group["mu"]) and 0 <= group["mu"] < 1, "in [0, 1)", group["mu"])
    rf = group["rank_fraction"]
    _check(p + "rank_fraction", _is_number(rf) and 0 < rf <= 1, "in (0, 1]", rf)
    rm = group["rank_multiple_of"]
    _check(p + "rank_multiple_of", isinstance(rm, int) and not isinstance(rm, bool) and rm >= 1,
           "an int >= 1", rm)
    wd = group["weight_decay"]
    _check(p + "weight_decay", _is_number(wd) and wd >= 0, "a finite number >= 0", wd)
    betas = group["betas"]
    _check(p + "betas", isinstance(betas, (tuple, list)) and len(betas) == 2
           and all(_is_number(b) and 0 <= b < 1 for b in betas), "two numbers in [0, 1)", betas)
    _check(p + "eps", _is_number(group["eps"]) and group["eps"] >= 0, "a finite number >= 0",
           group["eps"])
    pi = group["power_iters"]
    _check(p + "power_iters", isinstance(pi, int) and not isinstance(pi, bool) and pi >= 1,
           "an int >= 1", pi)
    _check(p + "orthonormalize", group["orthonormalize"] in METHODS, f"one of {METHODS}",
           group["orthonormalize"])
    _check(p + "lr_scale", group["lr_scale"] in LR_SCALES, f"one of {LR_SCALES}",
           group["lr_scale"])
    _check(p + "algorithm", group["algorithm"] in ALGORITHMS, f"one of {ALGORITHMS}",
           group["algorithm"])
    _check(p + "flatten", isinstance(group["flatten"], bool), "a bool", group["flatten"])
    sd = group["state_dtype"]
    _check(p + "state_dtype", sd is None or (isinstance(sd, torch.dtype) and sd.is_floating_point),
           "None or a floating torch.dtype", sd)
    md = group["matmul_dtype"]
    _check(p + "matmul_dtype", md is None or md in MATMUL_DTYPES,
           "None, torch.bfloat16, torch.float16 or torch.float32", md)


class Dion(Optimizer):
    r"""Dion: orthonormalized updates by one warm-started power-iteration step with error feedback.

    For each matrix X (m, n) in a ``"dion"`` group, with A the canonical orientation (X if
    m >= n, else X^T, shape (a, b)), momentum M and Q (b, r)::

        B = M + G
        P = orthonormalize(B Q)
        R = B^T P
        M = B - (1 - mu) P R^T
        Q = R / (column_norms(R) + eps)
        X = X (1 - lr * weight_decay) - lr * scale(m, n) * P Q^T

    r = min(b, ceil_to_multiple(rank_fraction * b, rank_multiple_of)). Other parameters use
    AdamW or Lion (``algorithm`` per group); build the groups with :func:`torchdion.param_groups`.

    Args:
        params: parameters or parameter groups. Every hyperparameter below except ``seed`` and
            ``raise_on_nonfinite`` can be set per group; an unknown group key raises.
            ``param_names`` and torch's implementation switches (``fused``, ``foreach``,
            ``capturable``, ``differentiable``, ``maximize``) are accepted in groups when
            False or None, as frameworks such as torchtitan put them there; True raises.
        lr: learning rate (Dion and the element-wise algorithms).
        mu: Dion momentum decay of the captured part, in [0, 1).
        rank_fraction: r / min(m, n), in (0, 1].
        rank_multiple_of: r is rounded up to a multiple of this (then capped at min(m, n)).
        weight_decay: decoupled weight decay, multiplied by lr.
        betas: (beta1, beta2) of AdamW / Lion.
        eps: AdamW's denominator epsilon and Dion's column-norm epsilon.
        power_iters: power-iteration steps per Dion step.
        orthonormalize: "randomized" (sketched QR then Cholesky QR), "qr" (Householder) or
            "cholesky" (Cholesky QR, falling back to randomized when ill-conditioned).
        lr_scale: "spectral" (sqrt(m / n)), "rms" (0.2 sqrt(max(m, n)), AdamW-like update RMS)
            or "none".
        algorithm: "dion", "adamw" or "lion".
        flatten: treat a (out, in, *k) tensor as an (out, in * prod(k)) matrix.
        state_dtype: dtype of momentum, Q and AdamW moments (None: the parameter's). The math
            runs in fp32 (fp64 for fp64 parameters) whatever the storage dtype.
        matmul_dtype: None (exact: the math's dtype) or torch.bfloat16 / torch.float16: the
            four (a, b)-sized products of a Dion step (B Q, B^T P, P R^T, P Q^T) take their inputs
            in this dtype; the orthonormalization of P, the column norms, momentum, Q and weight
            writes stay in fp32 (fp64 for fp64 parameters).
        seed: seeds the initial Q and the randomized sketches; equal on every process.
        raise_on_nonfinite: raise instead of skipping a parameter whose gradient is not finite.
        replicate_group: data-parallel replicas (a ProcessGroup or a 1-D DeviceMesh) whose
            gradients the optimizer synchronizes itself: element-wise gradients by a bucketed
            all-reduce, Dion matrices by exchanging the factors P and R (or their full gradient
            where (a + b) r >= a b). Run the model without DDP (or under ``no_sync``). Sharding
            (FSDP2 / tensor parallel DTensors) is read from the parameters themselves.
        gradients_synchronized: the gradients arriving at ``step`` are already averaged over
            ``replicate_group`` (e.g. by DDP); the optimizer then only keeps replicas' state equal.

    State per Dion parameter ``p``: ``state[p]["momentum"]`` (p's shape), ``state[p]["Q"]``
    (min(m, n), r) and ``state[p]["step"]``. A parameter whose step met a non-finite value keeps
    its weights and state for that step; ``nonfinite_skips`` counts such (parameter, step) pairs.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.01,
        mu: float = 0.95,
        rank_fraction: float = 1.0,
        rank_multiple_of: int = 1,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        power_iters: int = 1,
        orthonormalize: str = "randomized",
        lr_scale: str = "spectral",
        algorithm: str = "dion",
        flatten: bool = False,
        state_dtype: torch.dtype | None = None,
        matmul_dtype: torch.dtype | None = None,
        *,
        seed: int = 0,
        raise_on_nonfinite: bool = False,
        replicate_group: dist.ProcessGroup | DeviceMesh | None = None,
        gradients_synchronized: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, mu=mu, rank_fraction=rank_fraction, rank_multiple_of=rank_multiple_of,
            weight_decay=weight_decay, betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps, power_iters=power_iters, orthonormalize=orthonormalize, lr_scale=lr_scale,
            algorithm=algorithm, flatten=flatten, state_dtype=state_dtype,
            matmul_dtype=matmul_dtype,
        )
        validate_hyperparameters(defaults)
        _check("seed", isinstance(seed, int) and not isinstance(seed, bool), "an int", seed)
        self.seed = seed
        self.raise_on_nonfinite = bool(raise_on_nonfinite)
        self.nonfinite_skips = 0  # the property below: a count kept on the device
        if isinstance(replicate_group, DeviceMesh):
            _check("replicate_group", replicate_group.ndim == 1, "a 1-D DeviceMesh",
                   replicate_group)
            replicate_group = replicate_group.get_group()
        self.replicate_group = None if group_size(replicate_group) == 1 else replicate_group
        self.gradients_synchronized = bool(gradients_synchronized)
        self._comm = Comm()
        self._plans: dict[Tensor, MatrixPlan] = {}
        super().__init__(params, defaults)
        if self.replicate_group is not None:
            self._check_replicas_identical()

    # ----------------------------------------------------------------- groups and state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_framework_flags(param_group, where=f"param_groups[{len(self.param_groups)}].")
        unknown = set(param_group) - set(self.defaults) - _FOREIGN_KEYS - set(FRAMEWORK_FLAGS)
        if unknown:
            raise ValueError(
                f"unknown parameter group key(s) {sorted(unknown)}; known keys: "
                f"{sorted(self.defaults)}"
            )
        merged = {**self.defaults, **param_group}
        validate_hyperparameters(merged, where=f"param_groups[{len(self.param_groups)}].")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            # torch only warns; a repeated parameter would be stepped twice per step
            where = f"param_groups[{len(self.param_groups) - 1}].params"
            if len({id(p) for p in group["params"]}) != len(group["params"]):
                raise ValueError(f"{where} lists a parameter more than once")
            for j, p in enumerate(group["params"]):
                # complex would need conjugate transposes (Dion) and |g|^2 (AdamW) throughout
                if not p.dtype.is_floating_point:
                    raise ValueError(f"{where}[{j}] must be a real floating-point tensor, got "
                                     f"{p.dtype}")
            if group["algorithm"] == "dion":
                for p in group["params"]:  # shapes and placements fail here, not mid-step
                    self.plan(p, group)
        except ValueError:
            self.param_groups.pop()
            for p in group["params"]:  # a failed add leaves no cached plan behind
                self._plans.pop(p, None)
            raise

    def plan(self, p: Tensor, group: dict[str, Any]) -> MatrixPlan:
        """The Dion parameter ``p``'s :class:`~torchdion.matrix_plan.MatrixPlan` (computed on
        first use, then cached): matrix shape, orientation, local block, groups, rank, and what
        crosses the replicas."""
        plan = self._plans.get(p)
        if plan is None:
            name = self._name(p)
            replicas = self.replicate_group if self._syncs_gradients() else None
            plan = plan_matrix(
                tuple(p.shape), shards_of(p, name), flatten=group["flatten"],
                rank_fraction=group["rank_fraction"],
                rank_multiple_of=group["rank_multiple_of"],
                orthonormalize=group["orthonormalize"], replicas=replicas,
                replicas_size=group_size(replicas), name=name)
            self._plans[p] = plan
        return plan

    def _name(self, p: Tensor) -> str:
        """The parameter's name for messages: its ``param_names`` entry when groups carry them."""
        for gi, group in enumerate(self.param_groups):
            for i, q in enumerate(group["params"]):
                if q is p:
                    if "param_names" in group:
                        return f"{group['param_names'][i]!r} (shape {tuple(p.shape)})"
                    return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"
        return f"parameter of shape {tuple(p.shape)}"

    def _syncs_gradients(self) -> bool:
        return self.replicate_group is not None and not self.gradients_synchronized

    def comm_stats(self) -> dict[str, Any]:
        """What this process sent in collectives during the last step.

        ``{"bytes": int, "collectives": int, "largest": int, "largest_matrix_fraction": float,
        "by_kind": {kind: {"bytes", "collectives", "elements"}}}``; ``largest`` is the element
        count of the largest single tensor (one matrix's or one gradient's share of a bucket),
        ``largest_matrix_fraction`` the largest Dion factor sent relative to its matrix's m n
        (below 1: no matrix was ever reconstructed). Kinds: "grad" (element-wise
        and full-gradient sync), "P", "R", "sketch", "gram", "norms", "state" (checkpoint
        averaging). Bytes are payloads handed to all-reduce.
        """
        return self._comm.ledger.as_dict()

    def average_replica_state(self) -> None:
        """Replace each replica's Dion momentum by the replicas' mean, in place.

        Only the mean of the replicas' momenta determines the weights, so this changes no future
        weight; afterwards every replica holds the same state and any one of them is a complete
        checkpoint. Call it before ``state_dict`` / ``torch.distributed.checkpoint.save``.
        """
        self._comm.new_step()
        momenta = [local_tensor(self.state[p]["momentum"])
                   for group in self.param_groups if group["algorithm"] == "dion"
                   for p in group["params"]
                   if self.state[p] and self.plan(p, group).replica_sync == "factors"]
        self._comm.all_reduce_mean(momenta, self.replicate_group, "state")

    def _check_replicas_identical(self) -> None:
        params = [local_tensor(p) for g in self.param_groups for p in g["params"]]
        if not params:
            return
        # Fingerprints accumulated in fp64 without fp64 copies of large tensors (embeddings).
        f64 = torch.float64
        prints = torch.stack([
            torch.stack([t.sum(dtype=f64), (t * t).sum(dtype=f64),
                         t.flatten()[::7].sum(dtype=f64), t.flatten()[1::11].sum(dtype=f64)])
            for t in params]).cpu()
        lo, hi = prints.clone(), prints.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.replicate_group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.replicate_group)
        differ = (lo != hi).any(1).nonzero().flatten().tolist()
        if differ:
            names = [self._name(p) for g in self.param_groups for p in g["params"]]
            raise ValueError(
                f"replicate_group: replicas start from different weights ({len(differ)} "
                f"parameter(s), first {names[differ[0]]}); broadcast the model from one rank "
                "(or seed it identically) before building the optimizer"
            )

    def _forget_replaced(self) -> None:
        """Drop what was kept for tensors that are no longer in ``param_groups``.

        Frameworks replace them after construction: Accelerate's FSDP2 ``prepare`` puts each
        parameter's sharded DTensor in its place. The new tensors get their layout and state at
        this step, and the old ones can be freed. State already built for a replaced tensor
        cannot follow it (nothing says which tensor took its place), so that raises before
        anything is written."""
        current = {p for group in self.param_groups for p in group["params"]}
        stale = [p for p in (*self._plans, *self.state) if p not in current]
        if not stale:
            return
        orphans = sum(1 for p in self.state if p not in current and self.state[p])
        if orphans:
            raise ValueError(
                f"{orphans} parameter(s) with optimizer state were replaced in param_groups "
                "(e.g. by Accelerate's FSDP2 prepare, which puts sharded DTensors in their "
                "place), and their state cannot follow them: build the optimizer after wrapping "
                "the model and step only then, or save its state_dict before and load it after")
        for p in stale:
            self._plans.pop(p, None)
            self.state.pop(p, None)

    def _param_index(self) -> dict[Tensor, int]:
        return {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def _init_state(self, p: Tensor, group: dict[str, Any], index: int) -> None:
        state = self.state[p]
        dtype = group["state_dtype"] or p.dtype
        zeros = dict(dtype=dtype, memory_format=torch.contiguous_format)
        state["step"] = 0
        if group["algorithm"] == "dion":
            plan = self.plan(p, group)
            state["momentum"] = torch.zeros_like(p, **zeros)
            Q = initial_q(plan.b, plan.rank, self.seed, index, dtype)[plan.col_slice]
            state["Q"] = q_state(Q.to(local_tensor(p).device), p, plan)
        else:
            state["exp_avg"] = torch.zeros_like(p, **zeros)
            if group["algorithm"] == "adamw":
                state["exp_avg_sq"] = torch.zeros_like(p, **zeros)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; shapes are checked first, so a mismatch changes nothing.

        Q's rank must match: a checkpoint saved with another ``rank_fraction`` (or
        ``rank_multiple_of``) raises ValueError rather than being silently reshaped. torch casts
        floating state to the parameter's dtype on load; ``state_dtype`` is put back (exact: the
        saved values were of that dtype)."""
        self._check_loadable(state_dict)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            dtype = group["state_dtype"]
            if dtype is None:
                continue
            for p in group["params"]:
                state = self.state[p]
                for key, value in state.items():
                    if key != "step" and isinstance(value, Tensor) and value.is_floating_point():
                        state[key] = value.to(dtype)

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} parameter groups, this "
                             f"optimizer has {len(self.param_groups)}")
        saved_state = state_dict.get("state", {})
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict param_groups[{gi}] has {len(saved['params'])} "
                                 f"parameters, this optimizer's has {len(group['params'])}")
            # torch would load these with the other hyperparameters, and the state would then
            # not be the state of the algorithm that steps it
            for name in ("algorithm", "flatten"):
                if name in saved and saved[name] != group[name]:
                    raise ValueError(f"state_dict param_groups[{gi}] has {name}="
                                     f"{saved[name]!r}, this optimizer's has {group[name]!r}")
            for key, p in zip(saved["params"], group["params"]):
                state = saved_state.get(key, {})
                for name in ("momentum", "exp_avg", "exp_avg_sq"):
                    if name in state and tuple(state[name].shape) != tuple(p.shape):
                        raise ValueError(
                            f"state_dict {name} of parameter {self._name(p)} has shape "
                            f"{tuple(state[name].shape)}, expected {tuple(p.shape)}")
                if "Q" in state and group["algorithm"] == "dion":
                    plan = self.plan(p, group)
                    if tuple(state["Q"].shape) != (plan.b, plan.rank):
                        raise ValueError(
                            f"state_dict Q of parameter {self._name(p)} has shape "
                            f"{tuple(state['Q'].shape)}, expected {(plan.b, plan.rank)}: the "
                            "checkpoint "
                            "was saved with another rank_fraction / rank_multiple_of; load it "
                            "with the same ones")

    # ----------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        self._forget_replaced()
        self._comm.new_step()
        index = None
        dion_batches: dict[BatchKey, list[Tensor]] = defaultdict(list)
        elementwise_groups: list[tuple[dict[str, Any], list[Tensor]]] = []
        for gi, group in enumerate(self.param_groups):
            with_grad = []
            for p in group["params"]:
                # Every trainable parameter gets its state at the first step, gradient or not, so
                # that a step without gradients builds what a checkpoint is loaded into; a frozen
                # one (requires_grad=False) gets none until it has a gradient.
                if not self.state[p] and (p.requires_grad or p.grad is not None):
                    index = index or self._param_index()
                    self._init_state(p, group, index[p])
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"{self._name(p)} has a sparse gradient; Dion needs "
                                     "dense ones (nn.Embedding(sparse=False))")
                with_grad.append(p)
            if group["algorithm"] == "dion":
                for p in with_grad:
                    key = BatchKey(gi, self.plan(p, group), p.device, p.dtype,
                                   self.state[p]["step"])
                    dion_batches[key].append(p)
            else:
                elementwise_groups.append((group, with_grad))

        finish_sync = self._start_gradient_sync(elementwise_groups, dion_batches)
        dion_results = self._dion_phase(dion_batches)
        finish_sync()
        elementwise_results = [self._elementwise_phase(group, params)
                               for group, params in elementwise_groups]
        oks = [ok for _, ok in dion_results] + [ok for _, _, ok in elementwise_results]
        if self.raise_on_nonfinite:  # the one opt-in read of a flag by the host
            bad = sum(int((~ok).sum()) for ok in oks)
            if bad:
                raise FloatingPointError(f"{bad} parameter(s) met a non-finite gradient or "
                                         "update; nothing was changed")
        self._count_skips(oks)

        for (key, params), (result, _) in zip(dion_batches.items(), dion_results):
            self._apply_dion(self.param_groups[key.group], key.plan, params, result)
        for params, new, ok in elementwise_results:
            self._apply_elementwise(params, new, ok)
        return loss

    @property
    def nonfinite_skips(self) -> int:
        """(parameter, step) pairs skipped because a non-finite value appeared. Counted on the
        device; reading this property synchronizes with it."""
        counts = self.__dict__.get("_skip_counts", {})
        return self._skips_read + sum(int(c) for c in counts.values())

    @nonfinite_skips.setter
    def nonfinite_skips(self, value: int) -> None:
        self._skips_read, self._skip_counts = int(value), {}

    def _count_skips(self, oks: list[Tensor]) -> None:
        by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
        for ok in oks:
            if ok.numel():
                by_device[ok.device].append((~ok).sum())
        counts = self.__dict__.setdefault("_skip_counts", {})
        for device, bad in by_device.items():
            total = torch.stack(bad).sum()
            counts[device] = counts[device] + total if device in counts else total

    def _start_gradient_sync(self, elementwise_groups, dion_batches) -> Callable[[], None]:
        """Average the gradients that travel whole: element-wise ones and Dion matrices whose
        factors would not be smaller. One bucketed all-reduce, left in flight while Dion computes
        unless a Dion matrix needs its averaged gradient first. Returns the wait."""
        if not self._syncs_gradients():
            return lambda: None
        whole = [p for key, ps in dion_batches.items() for p in ps
                 if key.plan.replica_sync == "gradient"]
        grads = [local_tensor(p.grad) for _, ps in elementwise_groups for p in ps]
        grads += [local_tensor(p.grad) for p in whole]
        finish = self._comm.start_mean(grads, self.replicate_group, "grad")
        if whole:
            finish()
        return finish

    def _dion_phase(self, batches: dict[BatchKey, list[Tensor]]
                    ) -> list[tuple[DionStep, Tensor]]:
        gens, plans = [], []
        # Set lazily: torch's optimizer pickling keeps only defaults, state and groups.
        workspace = self.__dict__.get("_workspace")
        if workspace is None:
            workspace = self._workspace = Workspace()
        workspace.begin()
        for key, params in batches.items():
            group, plan, device = self.param_groups[key.group], key.plan, key.device
            compute = torch.float64 if params[0].dtype == torch.float64 else torch.float32
            momenta = [self._local_matrix(self.state[p]["momentum"], group) for p in params]
            B = accumulate(momenta, [self._local_matrix(p.grad, group) for p in params], compute,
                           workspace.take((len(params), *momenta[0].shape), compute, device))
            Q = torch.stack([local_tensor(self.state[p]["Q"]) for p in params]).to(compute)
            sketch = None
            if plan.sketch_rows:
                sketch = sketch_matrix(plan.sketch_rows, plan.a, self.seed, key.step + 1, device,
                                       compute)[:, plan.row_slice]
            matmul = group["matmul_dtype"]
            gens.append(dion_update(
                plan.canonical(B), Q, mu=group["mu"], eps=group["eps"],
                method=group["orthonormalize"], sketch=sketch, power_iters=group["power_iters"],
                tol=direction_tolerance(plan.a, plan.b, compute, matmul),
                matmul_dtype=matmul, momentum_dtype=momenta[0].dtype))
            plans.append(plan)
        results = run_lockstep(gens, plans, self._comm.complete)
        return [(res, res.ok) for res in results]

    @staticmethod
    def _local_matrix(t: Tensor, group: dict[str, Any]) -> Tensor:
        t = local_tensor(t)
        return t.reshape(t.shape[0], -1) if group["flatten"] and t.ndim > 2 else t

    def _apply_dion(self, group: dict[str, Any], plan: MatrixPlan, params: list[Tensor],
                    res: DionStep) -> None:
        lr, wd = float(group["lr"]), group["weight_decay"]
        alpha = -lr * lr_scale_factor(group["lr_scale"], plan.m, plan.n)
        for i, (p, ok) in enumerate(zip(params, res.ok.tolist())):
            if not ok:
                continue
            state = self.state[p]
            state["step"] += 1
            M = plan.canonical(self._local_matrix(state["momentum"], group))
            res.write_momentum(i, M)
            local_tensor(state["Q"]).copy_(res.Q[i])
            A = plan.canonical(self._local_matrix(p, group))
            res.apply_update(i, A, alpha, 1 - lr * wd)

    def _elementwise_phase(self, group: dict[str, Any], params: list[Tensor]):
        """The new weights and state of an element-wise group, in fp32, unwritten, and per
        parameter whether all of it is finite in the dtype it will be written in."""
        states = [self.state[p] for p in params]
        grads = [local_tensor(p.grad) for p in params]
        targets = [[local_tensor(p) for p in params],
                   [local_tensor(s["exp_avg"]) for s in states]]
        beta1, beta2 = group["betas"]
        lr, wd = float(group["lr"]), group["weight_decay"]
        if group["algorithm"] == "adamw":
            targets.append([local_tensor(s["exp_avg_sq"]) for s in states])
            new = elementwise.adamw(targets[0], grads, targets[1], targets[2],
                                    [s["step"] + 1 for s in states], lr=lr, beta1=beta1,
                                    beta2=beta2, eps=group["eps"], weight_decay=wd)
        else:
            new = elementwise.lion(targets[0], grads, targets[1], lr=lr, beta1=beta1,
                                   beta2=beta2, weight_decay=wd)
        ok = torch.ones(0, dtype=torch.bool)
        if params:
            ok = torch.stack([
                torch.stack([finite_in(n[i], t[i].dtype) for n, t in zip(new, targets)]).all()
                for i in range(len(params))])
        return params, list(zip(targets, new)), ok

    def _apply_elementwise(self, params: list[Tensor], new, ok: Tensor) -> None:
        """Write what :meth:`_elementwise_phase` computed, where it is finite; a skipped
        parameter keeps its step count too (the one read of the flags by the host)."""
        for i, (p, good) in enumerate(zip(params, ok.tolist())):
            self.state[p]["step"] += good
            for targets, values in new:
                masked_copy_(targets[i], values[i], ok[i])
