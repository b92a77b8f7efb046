"""Lightning: a LightningModule whose configure_optimizers returns dion_optimizers(...) trains on
CPU with Lightning's Trainer (which calls optimizer.step(closure)) and steps the LambdaLR."""

from __future__ import annotations

import pytest
import torch

L = pytest.importorskip("lightning", reason="lightning not installed "
                        "(pip install -e '.[integrations]')")

import torchdion  # noqa: E402
from torchdion.integrations.lightning import dion_optimizers, warmup_decay  # noqa: E402

STEPS, WARMUP = 12, 3


# --8<-- [start:recipe]
class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(),
                                       torch.nn.Linear(32, 32), torch.nn.GELU(),
                                       torch.nn.Linear(32, 1))
        self.losses: list[float] = []
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        self.lrs.append(self.optimizers().param_groups[0]["lr"])
        return loss

    def configure_optimizers(self):
        return dion_optimizers(self, lr=0.05, adam_lr=1e-2, warmup_steps=WARMUP,
                               total_steps=self.trainer.max_steps, head=self.net[-1])
# --8<-- [end:recipe]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)


def test_lightning_trains_with_dion_and_lambdalr(tmp_path):
    torch.manual_seed(0)
    # --8<-- [start:fit]
    module = Regression()
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, _data())
    # --8<-- [end:fit]
    (opt,) = trainer.optimizers
    assert isinstance(opt, torchdion.Dion)
    assert [g["algorithm"] for g in opt.param_groups] == ["dion", "adamw", "adamw"]
    assert len(module.losses) == STEPS
    assert sum(module.losses[-3:]) < 0.8 * sum(module.losses[:3]), module.losses
    expected = [0.05 * warmup_decay(WARMUP, STEPS)(s) for s in range(STEPS)]
    torch.testing.assert_close(module.lrs, expected)  # the scheduler stepped once per step
    assert opt.state[module.net[0].weight]["step"] == STEPS


def test_warmup_decay_shape():
    f = warmup_decay(2, 10, min_lr_ratio=0.1)
    assert [round(f(s), 6) for s in (0, 1, 2, 10, 50)] == [round(1 / 3, 6), round(2 / 3, 6),
                                                          1.0, 0.1, 0.1]
    assert warmup_decay(2, None, decay="none")(100) == 1.0
    with pytest.raises(ValueError, match="total_steps must exceed warmup_steps"):
        warmup_decay(5, 5)


def test_integrations_package_and_lightning_adapter_import_no_framework():
    import subprocess
    import sys

    code = ("import sys, torchdion.integrations, torchdion.integrations.lightning; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', "
            "'pytorch_lightning', 'transformers', 'torchtitan', 'accelerate'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
