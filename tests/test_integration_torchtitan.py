"""torchtitan: Dion built by OptimizersContainer from a config, init_optim_state, LR schedule,
and a DCP round trip of the container's flat state, on a tiny model named as torchtitan's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torchtitan.components.optimizer",
                    reason="torchtitan not installed (pip install --no-deps torchtitan)")
import torch.distributed.checkpoint as dcp  # noqa: E402
from torchtitan.components.optimizer import LRSchedulersContainer  # noqa: E402

import torchdion  # noqa: E402
from torchdion.integrations.torchtitan import DionOptimizersContainer, dion_optimizer_config  # noqa: E402,E501

DIM, VOCAB, EXPERTS = 16, 32, 2


class Block(nn.Module):
    """Parameter names of torchtitan's llama3 block (fused wqkv) and, with moe=True, its MoE."""

    def __init__(self, moe: bool):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(DIM), nn.RMSNorm(DIM)
        self.attention = nn.Module()
        self.attention.wqkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.attention.wo = nn.Linear(DIM, DIM, bias=False)
        self.moe = None
        if moe:
            self.moe = nn.Module()
            self.moe.router = nn.Module()
            self.moe.router.gate = nn.Linear(DIM, EXPERTS, bias=False)
            self.moe.experts = nn.Module()
            self.moe.experts.w1 = nn.Parameter(torch.randn(EXPERTS, 2 * DIM, DIM) / DIM**0.5)
            self.moe.experts.w2 = nn.Parameter(torch.randn(EXPERTS, DIM, 2 * DIM) / DIM**0.5)
        else:
            self.feed_forward = nn.Module()
            self.feed_forward.w1 = nn.Linear(DIM, 2 * DIM, bias=False)
            self.feed_forward.w2 = nn.Linear(2 * DIM, DIM, bias=False)

    def forward(self, x):
        q, k, v = self.attention.wqkv(self.attention_norm(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.mT / DIM**0.5, dim=-1) @ v
        x = x + self.attention.wo(att)
        h = self.ffn_norm(x)
        if self.moe is None:
            return x + self.feed_forward.w2(torch.relu(self.feed_forward.w1(h)))
        gate = torch.softmax(self.moe.router.gate(h), dim=-1)  # (T, E)
        hidden = torch.relu(torch.einsum("td,efd->etf", h, self.moe.experts.w1))
        out = torch.einsum("etf,edf->etd", hidden, self.moe.experts.w2)
        return x + torch.einsum("te,etd->td", gate, out)


class TinyTitan(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict({"0": Block(moe=False), "1": Block(moe=True)})
        self.norm = nn.RMSNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            x = layer(x)
        return self.lm_head(self.norm(x))


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyTitan()


def _loss(model, tokens):
    return nn.functional.cross_entropy(model(tokens[:-1]), tokens[1:])


TOKENS = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(1))


def test_container_builds_one_dion_with_name_pattern_groups_and_trains():
    model = _model()
    # --8<-- [start:build]
    config = dion_optimizer_config(lr=0.02, adam_lr=3e-3, rank_fraction=0.5)
    container = config.build(model_parts=[model])  # what torchtitan's Trainer does
    # --8<-- [end:build]
    assert isinstance(container, DionOptimizersContainer)
    (opt,) = container.optimizers
    assert isinstance(opt, torchdion.Dion)
    by_algorithm: dict[str, set[str]] = {}
    for group in opt.param_groups:
        assert group["fused"] is False and group["foreach"] is False  # torchtitan's keys
        by_algorithm.setdefault(group["algorithm"], set()).update(group["param_names"])
    hidden = {n for n, p in model.named_parameters() if p.ndim == 2
              and not n.startswith(("tok_embeddings", "lm_head"))}
    experts = {n for n, _ in model.named_parameters() if ".experts." in n}
    assert by_algorithm["dion"] == hidden | experts  # each expert its own Dion matrix
    assert by_algorithm["adamw"] == {n for n, _ in model.named_parameters()} - hidden - experts
    assert {"tok_embeddings.weight", "lm_head.weight"} <= by_algorithm["adamw"]
    stacked = [g for g in opt.param_groups if g.get("stacked")]
    assert {n for g in stacked for n in g["param_names"]} == experts
    dion_group = next(g for g in opt.param_groups if g["algorithm"] == "dion")
    assert dion_group["rank_fraction"] == 0.5 and dion_group["lr"] == 0.02

    # --8<-- [start:train]
    schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=None).build(
        optimizers=container, training_steps=10)
    losses = []
    for _ in range(10):
        container.zero_grad()
        loss = _loss(model, TOKENS)
        loss.backward()
        container.step()
        schedulers.step()
        losses.append(loss.item())
    # --8<-- [end:train]
    assert losses[-1] < 0.85 * losses[0], losses


def test_fused_implementation_is_refused_with_the_reason():
    config = dion_optimizer_config()
    config.implementation = "fused"  # torchtitan's own default
    with pytest.raises(ValueError, match=r"fused must be False or None, got True: Dion has no "
                                         r"fused kernel \(torchtitan: implementation='for-loop'"):
        config.build(model_parts=[_model()])


def test_init_optim_state_and_dcp_round_trip(tmp_path):
    model = _model()
    container = dion_optimizer_config(lr=0.02, rank_fraction=0.5).build(model_parts=[model])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flat = container.state_dict()  # init_optim_state: a zero-gradient, lr=0 step
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert "state.layers.0.attention.wo.weight.Q" in flat
    assert "state.layers.0.attention.wo.weight.momentum" in flat
    assert "state.tok_embeddings.weight.exp_avg_sq" in flat
    assert flat["param_groups.layers.0.attention.wo.weight.algorithm"] == "dion"

    for _ in range(3):
        container.zero_grad()
        _loss(model, TOKENS).backward()
        container.step()
    # --8<-- [start:dcp]
    dcp.save({"optimizer": container}, checkpoint_id=str(tmp_path / "ckpt"))

    twin = _model(seed=5)  # different weights and, once built, different state
    twin.load_state_dict(model.state_dict())
    twin_container = dion_optimizer_config(lr=0.02, rank_fraction=0.5).build(model_parts=[twin])
    dcp.load({"optimizer": twin_container}, checkpoint_id=str(tmp_path / "ckpt"))
    # --8<-- [end:dcp]
    a, b = container.optimizers[0].state_dict(), twin_container.optimizers[0].state_dict()
    for key, state in a["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][key][name])), \
                (key, name)
    for m, c in ((model, container), (twin, twin_container)):
        c.zero_grad()
        _loss(m, TOKENS).backward()
        c.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
