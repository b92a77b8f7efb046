"""Hugging Face transformers: Trainer(optimizer_cls_and_kwargs=dion_for_trainer(model)) trains a
tiny randomly initialized GPT-2 (config built here, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed "
                                   "(pip install -e '.[integrations]')")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import torchdion  # noqa: E402
from torchdion.integrations.transformers import dion_for_trainer  # noqa: E402

VOCAB, CONTEXT = 64, 16


# --8<-- [start:model]
def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=32, n_layer=2,
                                     n_head=2, tie_word_embeddings=True)
    return transformers.GPT2LMHeadModel(config)
# --8<-- [end:model]


class Repeating(torch.utils.data.Dataset):
    """Sequences counting up from a random start: learnable in a few steps."""

    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.ids = (starts + torch.arange(CONTEXT)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_groups_put_tied_head_and_embeddings_out_of_dion():
    model = _gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    cls, kwargs = dion_for_trainer(model, lr=0.02, adam_lr=1e-3, rank_fraction=0.5)
    assert cls is torchdion.Dion
    names = {id(p): n for n, p in model.named_parameters()}
    by_algorithm: dict[str, list[str]] = {}
    for group in kwargs["params"]:
        by_algorithm.setdefault(group["algorithm"], []).extend(names[id(p)]
                                                               for p in group["params"])
    assert sorted(n for n in by_algorithm["dion"]) == sorted(
        n for n, p in model.named_parameters() if p.ndim == 2 and "wte" not in n
        and "wpe" not in n)
    assert "transformer.wte.weight" in by_algorithm["adamw"]  # once: it is also lm_head's
    assert "transformer.wpe.weight" in by_algorithm["adamw"]
    assert sum(len(g["params"]) for g in kwargs["params"]) == len(list(model.parameters()))
    opt = cls(**kwargs)  # what Trainer does with params popped: cls(params, **rest)
    assert all(g["algorithm"] != "dion" or g["rank_fraction"] == 0.5 for g in opt.param_groups)


@pytest.mark.parametrize("lr_scale", [None, "spectral", "muon"])
def test_conv1d_steps_like_the_same_linear(lr_scale):
    """GPT-2's Conv1D stores (in, out): its step must equal nn.Linear's, (out, in), under each
    shape-dependent scale (None: Dion's default)."""
    torch.manual_seed(0)
    conv, linear = Conv1D(24, 8), torch.nn.Linear(8, 24, bias=False)  # out 24, in 8
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
    steps = []
    for module, weight in ((conv, conv.weight), (torch.nn.Sequential(linear), linear.weight)):
        extra = {} if lr_scale is None else {"lr_scale": lr_scale}
        cls, kwargs = dion_for_trainer(module, lr=0.05, weight_decay=0.1, **extra)
        opt = cls(**kwargs)
        for seed in range(3):
            g = torch.randn(24, 8, generator=torch.Generator().manual_seed(seed))
            weight.grad = g.T.clone() if weight is conv.weight else g
            opt.step()
        steps.append(weight.detach())
    torch.testing.assert_close(steps[0].T, steps[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(conv.weight.T, linear.weight * 0)  # the step did something


def test_trainer_trains_tiny_gpt2(tmp_path):
    # --8<-- [start:recipe]
    model = _gpt2()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=8, learning_rate=0.02,
        lr_scheduler_type="constant_with_warmup", warmup_steps=2, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Repeating(),
        optimizer_cls_and_kwargs=dion_for_trainer(model, lr=0.02, adam_lr=1e-2))
    trainer.train()
    # --8<-- [end:recipe]
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                      else trainer.optimizer, torchdion.Dion)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
