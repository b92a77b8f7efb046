"""Run by tests/test_integration_accelerate.py in a process of its own (it initializes a gloo
process group): Accelerate's FSDP2 prepare, which swaps the optimizer's parameters for DTensors.

Accelerate offers FSDP only on accelerators; on CPU the state's distributed type is set to FSDP
by hand after a MULTI_CPU (gloo) start, and ``Accelerator.prepare`` then runs its real FSDP2 path.
Prints one JSON line of findings.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import weakref

import torch
import torch.distributed as dist


def main(store_path: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 1), rank=0, world_size=1)
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    import torchdion

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(),
                                   torch.nn.Linear(16, 16), torch.nn.GELU(),
                                   torch.nn.Linear(16, 4))

    def batch(i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)

    def step(net, opt, i, backward=lambda loss: loss.backward()):
        x, y = batch(i)
        backward(torch.nn.functional.mse_loss(net(x), y))
        opt.step()
        opt.zero_grad()

    # --8<-- [start:prepare]
    accelerator = Accelerator(cpu=True)

    def prepare(net, opt):
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, cpu_ram_efficient_loading=False)
        assert accelerator.is_fsdp2
        return accelerator.prepare(net, opt)

    reference = model()
    ref_opt = torchdion.Dion(torchdion.param_groups(reference, head=reference[-1]), lr=0.05)
    net = model()
    opt = torchdion.Dion(torchdion.param_groups(net, head=net[-1]), lr=0.05)
    originals = [weakref.ref(p) for p in net.parameters()]
    net, opt = prepare(net, opt)
    # --8<-- [end:prepare]
    swapped = all(type(p).__name__ == "DTensor" for g in opt.param_groups for p in g["params"])
    for i in range(3):
        step(reference, ref_opt, i)
        step(net, opt, i, accelerator.backward)
    gc.collect()
    diff = max((p.full_tensor() - q).abs().max().item()
               for p, q in zip(net.parameters(), reference.parameters()))

    # an optimizer that stepped before the swap: its state belongs to the replaced tensors
    late = model()
    late_opt = torchdion.Dion(torchdion.param_groups(late, head=late[-1]), lr=0.05)
    step(late, late_opt, 0)
    late, late_opt = prepare(late, late_opt)
    late_swapped = [type(p).__name__ for g in late_opt.param_groups for p in g["params"]]
    before = [p.full_tensor().clone() for p in late.parameters()]
    error = ""
    try:
        step(late, late_opt, 1, accelerator.backward)
    except ValueError as e:
        error = str(e)
    unchanged = all(torch.equal(p.full_tensor(), q) for p, q in zip(late.parameters(), before))
    print(json.dumps({"swapped": swapped, "max_diff": diff,
                      "originals_freed": all(r() is None for r in originals),
                      "late_error": error, "late_unchanged": unchanged,
                      "late_swapped": late_swapped}))


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown of the gloo group (see tests/dist_worker.py)
