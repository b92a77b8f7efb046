"""The Dion optimizer: parameter groups, state, and the phases of a step."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.optim import Optimizer

from . import elementwise
from .checkpoint import check_loadable
from .comm import Comm, group_size
from .compiled import run_alone_compiled
from .dion2 import Dion2Step, dion2_update
from .layout import local_tensor, q_state, shards_of
from .masks import finite_in, masked_copy_
from .matrix_plan import MatrixPlan, plan_matrix
from .reduce import run_lockstep
from .replicas import check_replicas, describe
from .update import (
    DionStep,
    Workspace,
    accumulate,
    dion_update,
    direction_tolerance,
    initial_q,
    lr_scale_factor,
)
from .validation import FRAMEWORK_FLAGS as FRAMEWORK_FLAGS  # re-exported: part of the API
from .validation import (
    MATRIX_ALGORITHMS,
    PLAN_KEYS,
    STATE_KEYS,
    check,
    check_framework_flags,
    check_group_keys,
    check_scalars_fit,
    fill_algorithm_defaults,
    parameter_name,
    parameter_names,
    validate_hyperparameters,
)


class BatchKey(NamedTuple):
    """Dion matrices step together (stacked) when all of these are equal."""

    group: int  # index into param_groups: its hyperparameters
    plan: MatrixPlan  # shapes, block, rank and process groups
    device: torch.device
    dtype: torch.dtype
    step: int  # the randomized sketch is drawn per step


class Dion(Optimizer):
    r"""Dion: orthonormalized updates by one warm-started power-iteration step with error feedback.

    For each matrix X (m, n) in a ``"dion"`` group, with A the canonical orientation (X if
    m >= n, else X^T, shape (a, b)), momentum M and Q (b, r)::

        B = M + G
        C = G + mu B                      the Nesterov lookahead (nesterov=False: C = B)
        P = orthonormalize(C Q)
        R = C^T P
        M = B - (1 - mu) P (B^T P)^T      error feedback: only B's captured part decays
        Q = R / (column_norms(R) + eps)
        X = X (1 - lr * weight_decay) - lr * scale(m, n) * P Q^T

    r = min(b, ceil_to_multiple(rank_fraction * b, rank_multiple_of)); scale(m, n) =
    sqrt(max(1, m / n)) (``lr_scale="muon"``). The lookahead and this scale are Dion's defaults
    since they won the quality benchmark at every rank (docs/benchmarks.md); ``nesterov=False,
    lr_scale="spectral"`` is the paper's Dion.

    A ``"dion2"`` group selects the r columns of B = M + G with the largest L1 norms (A's
    columns: X's shorter side), orthonormalizes only them by Newton-Schulz, updates only them and
    multiplies only them by mu in M (Ahn, Amsel, Langford 2025; :mod:`torchdion.dion2`). A
    ``"muon"`` group is Dion2 with every column (r = b): Muon. Other parameters use
    AdamW or Lion (``algorithm`` per group); build the groups with :func:`torchdion.param_groups`.

    Args:
        params: parameters or parameter groups. Every hyperparameter below except ``seed`` and
            ``raise_on_nonfinite`` can be set per group; an unknown group key raises.
            ``param_names`` and torch's implementation switches (``fused``, ``foreach``,
            ``capturable``, ``differentiable``, ``maximize``) are accepted in groups when
            False or None, as frameworks such as torchtitan put them there; True raises.
        lr: learning rate (Dion and the element-wise algorithms).
        mu: momentum of Dion, Dion2 and Muon: the part of B a step uses (Dion's P P^T B,
            Dion2's selected columns, Muon's whole B) is kept times mu, in [0, 1). Dion2's paper
            calls it ef_decay, torch.optim.Muon momentum.
        rank_fraction: r / min(m, n), in (0, 1]; for Dion2 the fraction of columns selected
            (the paper's fraction). Muon ignores it (r = min(m, n)).
        rank_multiple_of: r is rounded up to a multiple of this (then capped at min(m, n)).
        weight_decay: decoupled weight decay, multiplied by lr.
        betas: (beta1, beta2) of AdamW / Lion.
        eps: AdamW's denominator epsilon, Dion's column-norm epsilon and the floor of the norm
            Newton-Schulz divides by.
        power_iters: power-iteration steps per Dion step.
        orthonormalize: "randomized" (sketched QR then Cholesky QR), "qr" (Householder) or
            "cholesky" (Cholesky QR, falling back to randomized when ill-conditioned).
        lr_scale: "spectral" (sqrt(m / n)), "muon" (sqrt(max(1, m / n)), torch.optim.Muon's and
            Keller Jordan's), "rms" (0.2 sqrt(max(m, n)), AdamW-like update RMS) or "none".
            None: "muon" for Dion, "spectral" for Dion2 and Muon
            (:data:`torchdion.validation.ALGORITHM_DEFAULTS`).
        algorithm: "dion", "dion2", "muon", "adamw" or "lion".
        flatten: treat a (out, in, *k) tensor as an (out, in * prod(k)) matrix.
        stacked: treat a (*batch, m, n) tensor as prod(batch) independent (m, n) matrices (the
            experts of a mixture-of-experts layer), each with its own Q, rank, scale and
            non-finite / zero-momentum handling, stepped in one batched computation. A DTensor
            sharded on a batch dim (expert parallelism) steps the matrices each process holds.
            Excludes ``flatten``.
        state_dtype: dtype of momentum, Q and AdamW moments (None: the parameter's). The math
            runs in fp32 (fp64 for fp64 parameters) whatever the storage dtype.
        matmul_dtype: None (exact: the math's dtype) or torch.bfloat16 / torch.float16: the
            four (a, b)-sized products of a Dion step (B Q, B^T P, P R^T, P Q^T) and, in bf16,
            the randomized sketch product take their inputs in this dtype; the Gram, Cholesky and
            solves of P's orthonormalization, the column norms, momentum, Q and weight writes
            stay in fp32 (fp64 for fp64 parameters). For Dion2 and Muon: Newton-Schulz's iterate
            and products, as in torch.optim.Muon (the Grams are summed in fp32).
        ns_steps: Newton-Schulz steps of Dion2 and Muon (coefficients in :mod:`torchdion.dion2`).
        nesterov: take the direction from the lookahead G + mu B instead of B (torch.optim.Muon's
            default is True). Dion's error feedback still removes B's captured part. None: True
            for Dion, False for Dion2 and Muon.
        polar_q: Dion's right factor is the polar factor of R (R (R^T R)^-1/2) instead of R's
            normalized columns: P Q^T = polar(P P^T C), at full rank Muon's direction.
        direction_tol: directions of R at or below this fraction of the largest (column norms,
            or singular values with polar_q) give no Dion update; 0 keeps all but those at
            rounding level (:func:`torchdion.update.direction_tolerance`).
        seed: seeds the initial Q and the randomized sketches; equal on every process.
        raise_on_nonfinite: raise instead of skipping a parameter whose gradient is not finite.
        replicate_group: data-parallel replicas (a ProcessGroup or a 1-D DeviceMesh) whose
            gradients the optimizer synchronizes itself: element-wise gradients by a bucketed
            all-reduce, Dion matrices by exchanging the factors P and R (or their full gradient
            where (a + b) r >= a b; Dion2 and Muon always average the full gradient: they have no
            factors to exchange). Run the model without DDP (or under ``no_sync``). Sharding
            (FSDP2 / tensor parallel DTensors) is read from the parameters themselves.
        gradients_synchronized: the gradients arriving at ``step`` are already averaged over
            ``replicate_group`` (e.g. by DDP); the optimizer then only keeps replicas' state equal.

        update: the per-batch Dion step, :func:`torchdion.update.dion_update` unless given;
            a substitute takes and returns what it does (for research variants and the drift
            benchmark).
        compile: run each Dion / Dion2 / Muon batch's update as one ``torch.compile`` graph
            (``fullgraph=True``) where its layout completes no sum across processes (one device,
            expert parallelism alone); elsewhere the update runs eagerly. Each distinct batch
            shape compiles on its first step (seconds each). Off by default; see
            :mod:`torchdion.compiled` and docs/usage.md for what it gains.

    State per Dion parameter ``p``: ``state[p]["momentum"]`` (p's shape), ``state[p]["Q"]``
    ((*batch, min(m, n), r); batch is () unless stacked) and ``state[p]["step"]``; Dion2 and
    Muon keep no Q. A matrix whose step met a non-finite value (or a value its storage dtype
    cannot hold) keeps its weights and state for that step (in a stack, only that matrix), its
    step count aside; ``nonfinite_skips`` counts such (matrix, step) pairs. For Dion and the
    element-wise algorithms these decisions are made on the device: ``step()`` reads nothing
    back to the host (``raise_on_nonfinite`` and ``orthonormalize="cholesky"``, which reads
    whether its fallback is needed, excepted), and ``nonfinite_skips`` synchronizes only when
    read.

    With ``replicate_group`` (gradients not synchronized), every trainable parameter takes part
    in every step on every replica, and a replica without a gradient for it counts as a zero
    gradient in the replicas' mean (as DDP does with unused parameters), so all replicas issue
    the same collectives whatever gradients exist. Hyperparameters are validated again at every
    step before anything is written; a change that the state cannot follow (a new rank after
    the first step) raises.
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
        lr_scale: str | None = None,
        algorithm: str = "dion",
        flatten: bool = False,
        state_dtype: torch.dtype | None = None,
        matmul_dtype: torch.dtype | None = None,
        stacked: bool = False,
        ns_steps: int = 5,
        nesterov: bool | None = None,
        polar_q: bool = False,
        direction_tol: float = 0.0,
        *,
        seed: int = 0,
        raise_on_nonfinite: bool = False,
        replicate_group: dist.ProcessGroup | DeviceMesh | None = None,
        gradients_synchronized: bool = False,
        update: Callable[..., Any] = dion_update,
        compile: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, mu=mu, rank_fraction=rank_fraction, rank_multiple_of=rank_multiple_of,
            weight_decay=weight_decay, betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps, power_iters=power_iters, orthonormalize=orthonormalize, lr_scale=lr_scale,
            algorithm=algorithm, flatten=flatten, state_dtype=state_dtype,
            matmul_dtype=matmul_dtype, stacked=stacked, ns_steps=ns_steps, nesterov=nesterov,
            polar_q=polar_q, direction_tol=direction_tol,
        )
        validate_hyperparameters(defaults)
        check("seed", isinstance(seed, int) and not isinstance(seed, bool), "an int", seed)
        check("update", callable(update), "callable", update)
        check("compile", isinstance(compile, bool), "a bool", compile)
        self.seed = seed
        self.raise_on_nonfinite = bool(raise_on_nonfinite)
        self.nonfinite_skips = 0  # the property below: a count kept on the device
        if isinstance(replicate_group, DeviceMesh):
            check("replicate_group", replicate_group.ndim == 1, "a 1-D DeviceMesh",
                  replicate_group)
            replicate_group = replicate_group.get_group()
        self.replicate_group = None if group_size(replicate_group) == 1 else replicate_group
        self.gradients_synchronized = bool(gradients_synchronized)
        self.update = update
        self.compile = compile
        self._comm = Comm()
        # per Dion parameter: its plan and the group settings it was made from
        self._plans: dict[Tensor, tuple[tuple, MatrixPlan]] = {}
        super().__init__(params, defaults)
        if self.replicate_group is not None:
            groups = self.param_groups
            check_replicas(self._comm, self.replicate_group, parameter_names(groups),
                           [describe(gi, g, p) for gi, g in enumerate(groups)
                            for p in g["params"]],
                           [local_tensor(p).detach() for g in groups for p in g["params"]])

    # Copies (deepcopy, pickle, torch.save) keep the settings and rebuild what is derived.
    _DERIVED = ("_comm", "_plans", "_workspace")

    def __getstate__(self) -> dict[str, Any]:
        if self.replicate_group is not None:
            raise TypeError(
                "a Dion optimizer with replicate_group cannot be copied or pickled: a process "
                "group cannot be. Save optimizer.state_dict() (after average_replica_state()) "
                "and load it into a new Dion built on the same group")
        kept = {k: v for k, v in vars(self).items()
                if k not in self._DERIVED and not k.startswith("_optimizer_")}
        return {**kept, **super().__getstate__()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # also called by torch's load_state_dict with only "state" and "param_groups"
        defaults = state.get("defaults", self.__dict__.get("defaults", {}))
        had_differentiable = "differentiable" in defaults
        super().__setstate__(state)
        if not had_differentiable:  # torch adds it; it is no hyperparameter of Dion's
            self.defaults.pop("differentiable", None)
        if "_comm" not in self.__dict__:  # a copy: rebuild what is derived
            self._comm = Comm()
            self._plans = {}

    # ----------------------------------------------------------------- groups and state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_framework_flags(param_group, f"param_groups[{len(self.param_groups)}].")
        check_group_keys(param_group, self.defaults, "")
        merged = {**self.defaults, **param_group}
        validate_hyperparameters(merged, where=f"param_groups[{len(self.param_groups)}].")
        super().add_param_group(param_group)
        group = fill_algorithm_defaults(self.param_groups[-1])
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
            if group["algorithm"] in MATRIX_ALGORITHMS:
                for p in group["params"]:  # shapes and placements fail here, not mid-step
                    self.plan(p, group)
        except ValueError:
            self.param_groups.pop()
            for p in group["params"]:  # a failed add leaves no cached plan behind
                self._plans.pop(p, None)
            raise

    def plan(self, p: Tensor, group: dict[str, Any]) -> MatrixPlan:
        """The Dion parameter ``p``'s :class:`~torchdion.matrix_plan.MatrixPlan`: matrix shape,
        orientation, local block, groups, rank, and what crosses the replicas. Computed on first
        use and again when the group's :data:`~torchdion.validation.PLAN_KEYS` change; a change
        of rank once ``p`` has a Q raises."""
        settings = tuple(group[k] for k in PLAN_KEYS)
        cached = self._plans.get(p)
        if cached is not None and cached[0] == settings:
            return cached[1]
        name = self._name(p)
        replicas = self.replicate_group if self._syncs_gradients() else None
        plan = plan_matrix(
            tuple(p.shape), shards_of(p, name), flatten=group["flatten"],
            stacked=group["stacked"],
            rank_fraction=group["rank_fraction"], rank_multiple_of=group["rank_multiple_of"],
            orthonormalize=group["orthonormalize"], replicas=replicas,
            replicas_size=group_size(replicas), name=name, algorithm=group["algorithm"])
        Q = self.state[p].get("Q") if p in self.state else None
        if Q is not None and Q.shape[-1] != plan.rank:
            raise ValueError(
                f"parameter {name}: rank_fraction / rank_multiple_of changed after its first "
                f"step (rank {Q.shape[-1]} -> {plan.rank}); Q cannot change rank. Set them "
                "before the first step, or start a new optimizer")
        self._plans[p] = (settings, plan)
        return plan

    def _name(self, p: Tensor) -> str:
        return parameter_name(self.param_groups, p)

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
        averaging), "fingerprint" (the replicas' check at construction). Bytes are payloads
        handed to all-reduce.
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

    def _forget_replaced(self) -> None:
        """Drop what was kept for tensors that are no longer in ``param_groups``.

        Frameworks replace them after construction: Accelerate's FSDP2 ``prepare`` puts each
        parameter's sharded DTensor in its place. The new tensors get their plan and state at
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

        def zeros() -> Tensor:
            return torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)

        state["step"] = 0
        if group["algorithm"] in MATRIX_ALGORITHMS:
            state["momentum"] = zeros()
        if group["algorithm"] == "dion":
            plan = self.plan(p, group)
            Q = initial_q(plan.b, plan.rank, self.seed, index, dtype, plan.batch)
            block = (*plan.batch_slices, plan.col_slice)
            Q = Q[block]
            state["Q"] = q_state(Q.to(local_tensor(p).device), p, plan)
        elif group["algorithm"] not in MATRIX_ALGORITHMS:
            state["exp_avg"] = zeros()
            if group["algorithm"] == "adamw":
                state["exp_avg_sq"] = zeros()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; everything is checked first (:mod:`torchdion.checkpoint`), so a
        state dict that does not fit raises ValueError and changes nothing.

        Q's rank must match: a checkpoint saved with another ``rank_fraction`` (or
        ``rank_multiple_of``) raises rather than being silently reshaped. Group keys a checkpoint
        lacks keep this optimizer's values. torch casts floating state to the parameter's dtype
        on load; ``state_dtype`` is put back (exact: the saved values were of that dtype)."""
        state_dict = check_loadable(state_dict, self.param_groups, set(self.defaults),
                                    self.plan, self._name)
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

    def _check_groups(self) -> None:
        """Every group's hyperparameters and every parameter's state and plan, before a step
        writes anything: schedulers and users change param_groups between steps."""
        for gi, group in enumerate(self.param_groups):
            where = f"param_groups[{gi}]."
            check_group_keys(group, self.defaults, where)
            validate_hyperparameters(fill_algorithm_defaults(group), where)
            expected = STATE_KEYS[group["algorithm"]]
            lr = float(group["lr"])
            for p in group["params"]:
                state = self.state.get(p)
                if state and set(state) != expected:
                    raise ValueError(
                        f"{where}algorithm is {group['algorithm']!r}, but parameter "
                        f"{self._name(p)} holds the state of another algorithm "
                        f"({sorted(state)}); the algorithm cannot change after a first step")
                scale = 1.0
                if group["algorithm"] in MATRIX_ALGORITHMS:
                    plan = self.plan(p, group)
                    scale = lr_scale_factor(group["lr_scale"], plan.m, plan.n)
                check_scalars_fit(lr, scale, group["weight_decay"], p, where, self._name)

    # ----------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        self._forget_replaced()
        self._check_groups()
        self._comm.new_step()
        index = None
        # A replica without a gradient sends zeros, so that every replica's buckets line up.
        zero_if_missing = self._syncs_gradients()
        grads: dict[Tensor, Tensor] = {}
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
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise ValueError(f"{self._name(p)} has a sparse gradient; Dion needs "
                                         "dense ones (nn.Embedding(sparse=False))")
                    grads[p] = p.grad
                elif zero_if_missing and self.state[p]:
                    grads[p] = torch.zeros_like(p)
                else:
                    continue
                with_grad.append(p)
            if group["algorithm"] in MATRIX_ALGORITHMS:
                for p in with_grad:
                    key = BatchKey(gi, self.plan(p, group), p.device, p.dtype,
                                   self.state[p]["step"])
                    dion_batches[key].append(p)
            else:
                elementwise_groups.append((group, with_grad))

        finish_sync = self._start_gradient_sync(elementwise_groups, dion_batches, grads)
        dion_results = self._dion_phase(dion_batches, grads)
        finish_sync()
        elementwise_results = [self._elementwise_phase(group, params, grads)
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
        self._skips_read = int(value)
        self._skip_counts: dict[torch.device, Tensor] = {}

    def _count_skips(self, oks: list[Tensor]) -> None:
        by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
        for ok in oks:
            if ok.numel():
                by_device[ok.device].append((~ok).sum())
        counts = self.__dict__.setdefault("_skip_counts", {})
        for device, bad in by_device.items():
            total = torch.stack(bad).sum()
            counts[device] = counts[device] + total if device in counts else total

    def _start_gradient_sync(self, elementwise_groups, dion_batches,
                             grads: dict[Tensor, Tensor]) -> Callable[[], None]:
        """Average the gradients that travel whole: element-wise ones and Dion matrices whose
        factors would not be smaller. One bucketed all-reduce, left in flight while Dion computes
        unless a Dion matrix needs its averaged gradient first. Returns the wait."""
        if not self._syncs_gradients():
            return lambda: None
        whole = [p for key, ps in dion_batches.items() for p in ps
                 if key.plan.replica_sync == "gradient"]
        tensors = [local_tensor(grads[p]) for _, ps in elementwise_groups for p in ps]
        tensors += [local_tensor(grads[p]) for p in whole]
        finish = self._comm.start_mean(tensors, self.replicate_group, "grad")
        if whole:
            finish()
        return finish

    def _dion_phase(self, batches: dict[BatchKey, list[Tensor]], grads: dict[Tensor, Tensor]
                    ) -> list[tuple[DionStep | Dion2Step, Tensor]]:
        # per batch: the update function and its arguments, run below
        calls: list[tuple[Callable[..., Any], tuple, dict[str, Any]]] = []
        plans: list[MatrixPlan] = []
        # Set lazily: torch's optimizer pickling keeps only defaults, state and groups.
        workspace = self.__dict__.get("_workspace")
        if workspace is None:
            workspace = self._workspace = Workspace()
        workspace.begin()
        for key, params in batches.items():
            group, plan, device = self.param_groups[key.group], key.plan, key.device
            compute = torch.float64 if params[0].dtype == torch.float64 else torch.float32
            momenta = [self._local_matrix(self.state[p]["momentum"], group) for p in params]
            B = accumulate(momenta, [self._local_matrix(grads[p], group) for p in params],
                           compute,
                           workspace.take((len(params), *momenta[0].shape), compute, device))
            matmul = group["matmul_dtype"]
            plans.append(plan)
            C = None
            if group["nesterov"]:  # C = G + mu B, the lookahead, for every algorithm
                C = workspace.take(B.shape, compute, device)
                for c, p, b in zip(C, params, B):
                    torch.add(self._local_matrix(grads[p], group).to(compute), b,
                              alpha=group["mu"], out=c)
                C = plan.canonical(C)
            if plan.algorithm != "dion":  # Dion2, and Muon as Dion2 with every column
                calls.append((dion2_update, (plan.canonical(B), C), dict(
                    k=plan.rank, b=plan.b, cols=plan.cols, mu=group["mu"],
                    ns_steps=group["ns_steps"], eps=group["eps"], matmul_dtype=matmul)))
                continue
            Q = torch.stack([local_tensor(self.state[p]["Q"]) for p in params]).to(compute)
            options: dict[str, Any] = {}  # passed only when on: a substitute update may lack them
            if C is not None:
                options["C"] = C
            if group["polar_q"]:
                options["polar_q"] = True
            if matmul is not None:  # the bf16 copies and products reuse the workspace
                options["scratch"] = workspace.on(device)
            calls.append((self.update, (plan.canonical(B), Q), dict(
                mu=group["mu"], eps=group["eps"], method=group["orthonormalize"],
                sketch=plan.sketch(self.seed, key.step + 1, device, compute),
                power_iters=group["power_iters"],
                tol=max(direction_tolerance(plan.a, plan.b, compute, matmul),
                        group["direction_tol"]),
                matmul_dtype=matmul, momentum_dtype=momenta[0].dtype, **options)))
        results: list[Any] = [None] * len(calls)
        together = []  # batches run in lockstep, their sums bucketed into shared collectives
        for i, ((update, args, kwargs), plan) in enumerate(zip(calls, plans)):
            if self.compile and all(group_size(g) == 1 for g in plan.groups.values()):
                kwargs.pop("scratch", None)  # a compiled graph plans its own buffers
                results[i] = run_alone_compiled(update, *args, **kwargs)
            else:
                together.append(i)
        done = run_lockstep([calls[i][0](*calls[i][1], **calls[i][2]) for i in together],
                            [plans[i] for i in together], self._comm.complete)
        for i, res in zip(together, done):
            results[i] = res
        return [(res, res.ok) for res in results]

    @staticmethod
    def _local_matrix(t: Tensor, group: dict[str, Any]) -> Tensor:
        t = local_tensor(t)
        return t.reshape(t.shape[0], -1) if group["flatten"] and t.ndim > 2 else t

    def _apply_dion(self, group: dict[str, Any], plan: MatrixPlan, params: list[Tensor],
                    res: DionStep | Dion2Step) -> None:
        lr, wd = float(group["lr"]), group["weight_decay"]
        alpha = -lr * lr_scale_factor(group["lr_scale"], plan.m, plan.n)
        for i, p in enumerate(params):
            # Written where the step is finite, decided on the device; the step count advances
            # either way (the host never reads the flags).
            state = self.state[p]
            state["step"] += 1
            M = plan.canonical(self._local_matrix(state["momentum"], group))
            A = plan.canonical(self._local_matrix(p, group))
            # All matrices of a stack at once, the writes masked on the device by ``ok``
            res.write_momentum(i, M)
            if isinstance(res, DionStep):  # Dion2 keeps no Q
                Q = local_tensor(state["Q"])
                Q.copy_((res.Q if res.Q_next is None else res.Q_next)[i])
            res.apply_update(i, A, alpha, 1 - lr * wd)

    def _elementwise_phase(self, group: dict[str, Any], params: list[Tensor],
                           grads: dict[Tensor, Tensor]):
        """The new weights and state of an element-wise group, in fp32, unwritten, and per
        parameter whether all of it is finite in the dtype it will be written in."""
        states = [self.state[p] for p in params]
        g = [local_tensor(grads[p]) for p in params]
        targets = [[local_tensor(p) for p in params],
                   [local_tensor(s["exp_avg"]) for s in states]]
        beta1, beta2 = group["betas"]
        lr, wd = float(group["lr"]), group["weight_decay"]
        new: tuple[Sequence[Tensor], ...]
        if group["algorithm"] == "adamw":
            targets.append([local_tensor(s["exp_avg_sq"]) for s in states])
            new = elementwise.adamw(targets[0], g, targets[1], targets[2],
                                    [s["step"] + 1 for s in states], lr=lr, beta1=beta1,
                                    beta2=beta2, eps=group["eps"], weight_decay=wd)
        else:
            new = elementwise.lion(targets[0], g, targets[1], lr=lr, beta1=beta1,
                                   beta2=beta2, weight_decay=wd)
        ok = torch.ones(0, dtype=torch.bool)
        if params:
            ok = torch.stack([
                torch.stack([finite_in(n[i], t[i].dtype) for n, t in zip(new, targets)]).all()
                for i in range(len(params))])
        return params, list(zip(targets, new)), ok

    def _apply_elementwise(self, params: list[Tensor], new, ok: Tensor) -> None:
        """Write what :meth:`_elementwise_phase` computed, where it is finite. The step count
        advances either way (the host never reads the flags)."""
        for i, p in enumerate(params):
            self.state[p]["step"] += 1
            for targets, values in new:
                masked_copy_(targets[i], values[i], ok[i])

