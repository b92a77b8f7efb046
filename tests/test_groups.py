"""Per-group hyperparameters, state_dtype, and the param_groups helper."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from models import TinyLM, batches, lm_step
from reference import rank
from torch import nn

import torchdion

# ------------------------------------------------------------------ per-group hyperparameters

DION_OVERRIDES = [
    ("lr", 0.05), ("mu", 0.5), ("rank_fraction", 0.25), ("rank_multiple_of", 3),
    ("weight_decay", 0.3), ("eps", 1e-2), ("power_iters", 2), ("orthonormalize", "qr"),
    ("lr_scale", "rms"), ("state_dtype", torch.float16), ("algorithm", "adamw"),
    ("algorithm", "lion"),
]
ELEMENTWISE_OVERRIDES = [
    ("lr", 0.05), ("betas", (0.5, 0.9)), ("weight_decay", 0.3), ("eps", 1e-3),
    ("state_dtype", torch.float16),
]


def _train(p, opt, steps=2):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return p.detach().clone(), dict(opt.state[p])


def _assert_equal_runs(a, b):
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for k, v in a[1].items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == b[1][k].dtype and torch.equal(v, b[1][k]), k
        else:
            assert v == b[1][k], k


def _differ(a, b):
    if not torch.equal(a[0], b[0]) or a[1].keys() != b[1].keys():
        return True
    return any(not (v.dtype == b[1][k].dtype and torch.equal(v, b[1][k]))
               if isinstance(v, torch.Tensor) else v != b[1][k] for k, v in a[1].items())


@pytest.mark.parametrize("name,value", DION_OVERRIDES)
def test_group_value_overrides_default_for_dion(name, value):
    base = dict(rank_fraction=0.6, rank_multiple_of=1, lr=0.02, weight_decay=0.01)  # r = 8

    def run(group_kw, ctor_kw):
        p = nn.Parameter(torch.randn(16, 12, generator=torch.Generator().manual_seed(0)))
        return _train(p, torchdion.Dion([{"params": [p], **group_kw}], **{**base, **ctor_kw}))

    via_group = run({name: value}, {})
    via_ctor = run({}, {name: value})
    default = run({}, {})
    _assert_equal_runs(via_group, via_ctor)
    assert _differ(via_group, default)


@pytest.mark.parametrize("algorithm", ["adamw", "lion"])
@pytest.mark.parametrize("name,value", ELEMENTWISE_OVERRIDES)
def test_group_value_overrides_default_for_elementwise(algorithm, name, value):
    if algorithm == "lion" and name == "eps":
        pytest.skip("Lion has no eps")

    def run(group_kw, ctor_kw):
        p = nn.Parameter(torch.randn(7, generator=torch.Generator().manual_seed(0)))
        group = {"params": [p], "algorithm": algorithm, **group_kw}
        kw = {"lr": 0.02, "weight_decay": 0.01, **ctor_kw}
        return _train(p, torchdion.Dion([group], **kw), steps=3)

    via_group = run({name: value}, {})
    _assert_equal_runs(via_group, run({}, {name: value}))
    assert _differ(via_group, run({}, {}))


def test_adamw_groups_match_torch_adamw():
    """Each group's betas, lr and weight decay, against torch.optim.AdamW."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    ours = [nn.Parameter(t.clone()) for t in init]
    theirs = [nn.Parameter(t.clone()) for t in init]
    hp = [dict(betas=(0.9, 0.999), lr=0.01, weight_decay=0.1),
          dict(betas=(0.5, 0.8), lr=0.03, weight_decay=0.0)]
    opt = torchdion.Dion([{"params": [p], "algorithm": "adamw", **h} for p, h in zip(ours, hp)],
                         eps=1e-8)
    ref = torch.optim.AdamW([{"params": [p], **h} for p, h in zip(theirs, hp)], eps=1e-8)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b, t in zip(ours, theirs, init):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(a, t)


def test_lion_matches_formula():
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(9, generator=gen, dtype=torch.float64))
    x, m = p.detach().clone(), torch.zeros(9, dtype=torch.float64)
    lr, wd, b1, b2 = 0.01, 0.2, 0.8, 0.97
    opt = torchdion.Dion([{"params": [p], "algorithm": "lion", "betas": (b1, b2)}], lr=lr,
                         weight_decay=wd)
    for _ in range(4):
        g = torch.randn(9, generator=gen, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        x = x * (1 - lr * wd) - lr * torch.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
    torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "shape,rank_fraction,multiple",
    [((10, 20), 0.3, 1), ((20, 10), 0.7, 1), ((100, 100), 0.07, 1), ((64, 48), 0.25, 1),
     ((64, 48), 0.25, 8), ((64, 48), 0.2, 16), ((48, 64), 1 / 3, 4), ((9, 1), 0.5, 4),
     ((1, 9), 0.01, 1), ((33, 33), 1.0, 32)],
)
def test_rank_fraction_sets_Q_shape(shape, rank_fraction, multiple):
    p = nn.Parameter(torch.randn(shape))
    opt = torchdion.Dion([{"params": [p], "rank_fraction": rank_fraction,
                           "rank_multiple_of": multiple}])
    p.grad = torch.randn(shape)
    opt.step()
    b = min(shape)
    r = rank(b, rank_fraction, multiple)
    assert 1 <= r <= b
    assert opt.state[p]["Q"].shape == (b, r)


def test_groups_with_different_ranks_in_one_optimizer():
    a, b = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(16, 8))
    opt = torchdion.Dion([{"params": [a], "rank_fraction": 0.25}, {"params": [b]}])
    a.grad, b.grad = torch.randn(16, 8), torch.randn(16, 8)
    opt.step()
    assert opt.state[a]["Q"].shape == (8, 2)
    assert opt.state[b]["Q"].shape == (8, 8)


def _regression(state_dtype):
    torch.manual_seed(0)
    teacher = 0.3 * torch.randn(8, 16)
    model = nn.Linear(16, 8)
    opt = torchdion.Dion(torchdion.param_groups(model), lr=0.05, state_dtype=state_dtype,
                         weight_decay=0.0)
    x = torch.randn(256, 16)
    y = x @ teacher.T
    losses = []
    for _ in range(40):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


def test_bf16_state_trains():
    """state_dtype=bfloat16 stores the state in bf16 and still fits a small regression."""
    model, opt, losses = _regression(torch.bfloat16)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.1 * losses[0]
    _, _, losses32 = _regression(None)
    assert abs(losses[-1] - losses32[-1]) < 0.1 * losses32[-1]
    w, bias = model.weight, model.bias
    assert w.dtype == torch.float32
    assert opt.state[w]["momentum"].dtype == torch.bfloat16
    assert opt.state[w]["Q"].dtype == torch.bfloat16
    assert opt.state[bias]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[bias]["exp_avg_sq"].dtype == torch.bfloat16


# ------------------------------------------------------------------ param_groups helper


def _ids(ps):
    return sorted(id(p) for p in ps)


def _by_algorithm(groups):
    return {g["algorithm"]: g for g in groups}


def test_param_groups_sorts_parameters():
    model = TinyLM()
    groups = torchdion.param_groups(model, head=model.head)
    assert [g["algorithm"] for g in groups] == ["dion", "adamw", "adamw"]
    dion, emb, other = groups
    assert _ids(dion["params"]) == _ids([model.fc1.weight, model.fc2.weight])
    assert _ids(emb["params"]) == _ids([model.emb.weight, model.head.weight])
    assert _ids(other["params"]) == _ids([model.fc1.bias, model.norm.weight, model.norm.bias])
    all_params = [p for g in groups for p in g["params"]]
    assert _ids(all_params) == _ids(model.parameters())


@pytest.mark.parametrize("head_kind", ["module", "tensor", "list"])
def test_param_groups_head_forms(head_kind):
    model = TinyLM()
    head = {"module": model.head, "tensor": model.head.weight,
            "list": [model.head.weight]}[head_kind]
    emb = torchdion.param_groups(model, head=head)[1]
    assert any(p is model.head.weight for p in emb["params"])


def test_param_groups_without_head_puts_untied_head_in_dion():
    model = TinyLM()
    dion = torchdion.param_groups(model)[0]
    assert any(p is model.head.weight for p in dion["params"])
    assert not any(p is model.emb.weight for p in dion["params"])


@pytest.mark.parametrize("pass_head", [False, True])
def test_param_groups_tied_head(pass_head):
    model = TinyLM()
    model.head.weight = model.emb.weight
    groups = torchdion.param_groups(model, head=model.head if pass_head else None)
    by = {i: g for i, g in enumerate(groups)}
    assert _ids(by[0]["params"]) == _ids([model.fc1.weight, model.fc2.weight])
    assert _ids(by[1]["params"]) == _ids([model.emb.weight])  # listed once
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params})
    opt = torchdion.Dion(groups)
    for x in batches(2):
        lm_step(model, opt, x)
    assert model.head.weight is model.emb.weight


def test_param_groups_overrides_and_lion():
    model = TinyLM()
    groups = torchdion.param_groups(
        model, head=model.head, elementwise="lion", dion=dict(lr=0.1, rank_fraction=0.5),
        embedding=dict(lr=0.002), other=dict(algorithm="adamw", weight_decay=0.0))
    dion, emb, other = groups
    assert dion["algorithm"] == "dion" and dion["lr"] == 0.1 and dion["rank_fraction"] == 0.5
    assert emb["algorithm"] == "lion" and emb["lr"] == 0.002
    assert other["algorithm"] == "adamw" and other["weight_decay"] == 0.0
    opt = torchdion.Dion(groups, lr=0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.002, 0.01]
    losses = [lm_step(model, opt, x) for x in batches(6)]
    assert all(math.isfinite(v) for v in losses)
    with pytest.raises(ValueError, match="elementwise"):
        torchdion.param_groups(model, elementwise="sgd")


def test_param_groups_skips_frozen_and_flattens_convs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    model[2].bias.requires_grad_(False)
    groups = torchdion.param_groups(model)
    dion = _by_algorithm(groups)["dion"]
    assert _ids(dion["params"]) == _ids([model[2].weight])
    assert all(p is not model[2].bias for g in groups for p in g["params"])
    other = groups[-1]
    assert any(p is model[0].weight for p in other["params"])  # 4-D without flatten

    groups = torchdion.param_groups(model, flatten=True)
    dion = _by_algorithm(groups)["dion"]
    assert dion["flatten"] is True
    assert _ids(dion["params"]) == _ids([model[0].weight, model[2].weight])
    opt = torchdion.Dion(groups)
    x = torch.randn(4, 3, 6, 6)
    loss = model(x).square().mean()
    loss.backward()
    before = model[0].weight.detach().clone()
    opt.step()
    assert opt.state[model[0].weight]["Q"].shape == (8, 8)
    assert not torch.equal(model[0].weight.detach(), before)


def test_warn_embeddings_in_dion():
    model = TinyLM()
    bad = [{"params": [model.emb.weight, model.fc1.weight]},
           {"params": [model.norm.weight], "algorithm": "adamw"}]
    with pytest.warns(UserWarning, match="emb"):
        torchdion.warn_embeddings_in_dion(model, bad)
    # an embedding in an element-wise group, and the helper's own groups, are fine
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchdion.warn_embeddings_in_dion(model, [{"params": [model.emb.weight],
                                                   "algorithm": "adamw"}])
        torchdion.warn_embeddings_in_dion(model, torchdion.param_groups(model, head=model.head))
