"""state_dict round trips and LR schedulers."""

from __future__ import annotations

import io

import pytest
import torch
from models import TinyLM, batches, lm_step

import torchdion


def _groups(model, state_dtype=None):
    return torchdion.param_groups(
        model, head=model.head,
        dion=dict(rank_fraction=0.5, state_dtype=state_dtype),
        embedding=dict(algorithm="adamw", lr=0.01),
        other=dict(algorithm="lion", lr=0.003, betas=(0.8, 0.98)),
    )


def _make(seed, state_dtype=None, method="randomized"):
    model = TinyLM(seed=seed)
    opt = torchdion.Dion(_groups(model, state_dtype), lr=0.02, weight_decay=0.01, seed=11,
                         orthonormalize=method)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    return model, opt, sched


def _assert_same(model_a, opt_a, model_b, opt_b):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name
    pa = [p for g in opt_a.param_groups for p in g["params"]]
    pb = [p for g in opt_b.param_groups for p in g["params"]]
    assert len(pa) == len(pb)
    for a, b in zip(pa, pb):
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert sa[key].dtype == sb[key].dtype, key
                assert torch.equal(sa[key], sb[key]), key
            else:
                assert sa[key] == sb[key], key
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
        assert {k: v for k, v in ga.items() if k != "params"} == {
            k: v for k, v in gb.items() if k != "params"}


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("method", ["randomized", "qr"])
def test_state_dict_round_trip_is_bitwise(state_dtype, method):
    data = batches(8)
    model, opt, sched = _make(0, state_dtype, method)
    for x in data[:4]:
        lm_step(model, opt, x)
        sched.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)
    for x in data[4:]:
        lm_step(model, opt, x)
        sched.step()

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2, sched2 = _make(5, state_dtype, method)  # different init: loading must fix it
    assert not torch.equal(model2.fc1.weight, TinyLM(seed=0).fc1.weight)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    for x in data[4:]:
        lm_step(model2, opt2, x)
        sched2.step()

    _assert_same(model, opt, model2, opt2)
    algorithms = {g["algorithm"] for g in opt2.param_groups}
    assert algorithms == {"dion", "adamw", "lion"}
    if state_dtype is not None:
        dion_params = opt2.param_groups[0]["params"]
        assert all(opt2.state[p]["momentum"].dtype == state_dtype for p in dion_params)


def test_state_dict_has_momentum_and_Q():
    model, opt, _ = _make(0)
    lm_step(model, opt, batches(1)[0])
    sd = opt.state_dict()
    dion = opt.param_groups[0]
    for p in dion["params"]:
        s = opt.state[p]
        assert s["momentum"].shape == p.shape
        b = min(p.shape)
        assert s["Q"].shape == (b, -(-b // 2))  # rank_fraction 0.5
        assert s["step"] == 1
    assert len(sd["state"]) == sum(len(g["params"]) for g in opt.param_groups)


def _lr_run(lr, factor):
    """Three steps with one lr for every group, through a LambdaLR of ``factor`` if not None."""
    model = TinyLM(seed=0)
    opt = torchdion.Dion(_groups(model), lr=lr, weight_decay=0.1, seed=3)
    for g in opt.param_groups:
        g["lr"] = lr
    sched = None if factor is None else torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factor)
    for x in batches(3):
        lm_step(model, opt, x)
        if sched is not None:
            sched.step()
    return model, opt


def test_scheduler_sets_applied_lr():
    """A LambdaLR with factor 1/2 gives the run with half the learning rate, exactly."""
    model_a, _ = _lr_run(0.04, 0.5)
    model_b, _ = _lr_run(0.02, None)
    model_c, _ = _lr_run(0.04, None)
    for a, b, c in zip(model_a.parameters(), model_b.parameters(), model_c.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(a, c)


def test_scheduler_to_zero_freezes_weights():
    model = TinyLM(seed=0)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torchdion.Dion(_groups(model), lr=0.02, weight_decay=0.1)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    assert all(g["lr"] == 0 for g in opt.param_groups)
    for x in batches(2):
        lm_step(model, opt, x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, init[k]), k
    # the optimizer did run: momenta and moments moved
    dion_p = opt.param_groups[0]["params"][0]
    assert opt.state[dion_p]["step"] == 2
    assert opt.state[dion_p]["momentum"].abs().sum() > 0
    emb = model.emb.weight
    assert opt.state[emb]["exp_avg"].abs().sum() > 0
