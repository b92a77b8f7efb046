"""Adapters for the frameworks people train with. Importing this package imports none of them.

Each submodule imports its framework only when it is itself imported:

- :mod:`torchdion.integrations.torchtitan`: a ``"Dion"`` entry for torchtitan's
  ``OptimizersContainer`` and parameter groups by name pattern.
- :mod:`torchdion.integrations.transformers`: the ``(Dion, kwargs)`` pair for
  ``transformers.Trainer(optimizer_cls_and_kwargs=...)``.
- :mod:`torchdion.integrations.lightning`: ``configure_optimizers`` with a warmup schedule
  (imports no Lightning: the dict is Lightning's plain format).

Accelerate needs no adapter: the DTensors its FSDP2 ``prepare`` puts into the optimizer's groups
are picked up by :class:`torchdion.Dion` at the next step.

Under a framework's data-parallel wrapper (DDP, FSDP2's HSDP) the gradients reach the optimizer
already averaged, so Dion runs with its gradients synchronized and sends nothing for them itself;
its compressed replica synchronization (``replicate_group``) needs a model without that wrapper.
"""
