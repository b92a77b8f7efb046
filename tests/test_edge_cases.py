"""Zero gradients, parameters without gradients, and non-finite gradients."""

from __future__ import annotations

import math

import pytest
import torch

import torchdion

METHODS = ("qr", "cholesky", "randomized")


def _snapshot(opt):
    params = [p for g in opt.param_groups for p in g["params"]]
    weights = [p.detach().clone() for p in params]
    state = [{k: (v.clone() if isinstance(v, torch.Tensor) else v)
              for k, v in opt.state[p].items()} for p in params]
    return params, weights, state


def _same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
               for k in a)


def _mixed(dtype=torch.float32, device="cpu", **kw):
    """Two Dion matrices (tall, wide), an AdamW vector and a Lion vector."""
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype).to(device))
          for s in [(8, 5), (3, 7), (6,), (4,)]]
    opt = torchdion.Dion(
        [{"params": ps[:2]}, {"params": [ps[2]], "algorithm": "adamw"},
         {"params": [ps[3]], "algorithm": "lion"}], lr=0.05, rank_fraction=0.5, **kw)
    return ps, opt, gen


def _grads(ps, gen):
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (1, 6), (6, 1), (4, 4)])
def test_zero_gradient_gives_no_update_and_keeps_Q(shape, method, device):
    p = torch.nn.Parameter(torch.randn(shape, device=device))
    opt = torchdion.Dion([p], weight_decay=0.0, orthonormalize=method)
    opt.step()  # no gradient: creates the state
    Q0 = opt.state[p]["Q"].clone()
    X0 = p.detach().clone()
    for _ in range(2):
        p.grad = torch.zeros(shape, device=device)
        opt.step()
    assert torch.equal(p.detach(), X0)
    assert torch.equal(opt.state[p]["Q"], Q0)
    assert not opt.state[p]["momentum"].any()
    assert opt.nonfinite_skips == 0
    # a later real gradient still trains from the kept Q
    p.grad = torch.randn(shape, device=device)
    opt.step()
    assert not torch.equal(p.detach(), X0)
    assert torch.isfinite(opt.state[p]["Q"]).all()


def test_zero_gradient_still_decays_weights():
    p = torch.nn.Parameter(torch.randn(6, 4))
    X0 = p.detach().clone()
    opt = torchdion.Dion([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(6, 4)
    opt.step()
    torch.testing.assert_close(p.detach(), X0 * (1 - 0.1 * 0.5))


def test_parameters_without_gradients():
    ps, opt, gen = _mixed()
    params, weights, _ = _snapshot(opt)
    ps[0].grad = torch.randn(ps[0].shape, generator=gen)
    ps[2].grad = torch.randn(ps[2].shape, generator=gen)
    opt.step()
    # state exists for every parameter, created but untouched where there was no gradient
    for p in ps:
        assert opt.state[p]["step"] == (1 if p.grad is not None else 0)
    assert opt.state[ps[1]]["Q"].shape == (3, 2)
    assert not opt.state[ps[1]]["momentum"].any()
    assert not opt.state[ps[3]]["exp_avg"].any()
    assert torch.equal(ps[1].detach(), weights[1])
    assert torch.equal(ps[3].detach(), weights[3])
    assert not torch.equal(ps[0].detach(), weights[0])
    assert not torch.equal(ps[2].detach(), weights[2])


def test_frozen_parameters_get_no_state():
    ps, opt, gen = _mixed()
    ps[1].requires_grad_(False)
    ps[3].requires_grad_(False)
    _, weights, _ = _snapshot(opt)
    for i in (0, 2):
        ps[i].grad = torch.randn(ps[i].shape, generator=gen)
    opt.step()
    assert not opt.state[ps[1]] and not opt.state[ps[3]]
    assert torch.equal(ps[1].detach(), weights[1]) and torch.equal(ps[3].detach(), weights[3])
    assert {i for i, st in opt.state_dict()["state"].items() if st} == {0, 2}
    ps[1].requires_grad_(True)  # unfrozen: it gets its state and trains from then on
    ps[1].grad = torch.randn(ps[1].shape, generator=gen)
    opt.step()
    assert opt.state[ps[1]]["step"] == 1
    assert not torch.equal(ps[1].detach(), weights[1])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("which", [0, 1, 2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_gradient_skips_that_parameter(bad, which, method, device):
    ps, opt, gen = _mixed(orthonormalize=method, device=device)
    _grads(ps, gen)
    opt.step()
    params, weights, state = _snapshot(opt)
    _grads(ps, gen)
    ps[which].grad.view(-1)[1] = bad
    opt.step()
    assert opt.nonfinite_skips == 1
    for i, p in enumerate(ps):
        assert torch.isfinite(p).all()
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor):
                assert torch.isfinite(v).all()
        # the step count advances either way: the host never reads the skip flags
        assert opt.state[p]["step"] == 2
        if i == which:
            assert torch.equal(p.detach(), weights[i])
            assert _same_state({**opt.state[p], "step": 1}, state[i])
        else:  # the others step as usual
            assert not torch.equal(p.detach(), weights[i])
    # and the skipped parameter trains again once its gradient is finite
    _grads(ps, gen)
    opt.step()
    assert opt.nonfinite_skips == 1
    assert not torch.equal(ps[which].detach(), weights[which])
    assert opt.state[ps[which]]["step"] == 3


def test_nonfinite_skips_count_parameters():
    ps, opt, gen = _mixed()
    _grads(ps, gen)
    for p in ps:
        p.grad[0] = math.nan
    opt.step()
    assert opt.nonfinite_skips == 4
    for p in ps:
        assert opt.state[p]["step"] == 1  # counted, though nothing else was written


def test_overflowing_update_is_skipped():
    """A finite gradient whose B Q overflows must not poison the state either."""
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = torchdion.Dion([p])
    opt.step()
    X0, Q0 = p.detach().clone(), opt.state[p]["Q"].clone()
    p.grad = torch.full((6, 4), 3e38)
    opt.step()
    assert opt.nonfinite_skips == 1
    assert torch.equal(p.detach(), X0)
    assert torch.equal(opt.state[p]["Q"], Q0)
    assert not opt.state[p]["momentum"].any()


@pytest.mark.parametrize("which", [0, 2, 3])
def test_raise_on_nonfinite_changes_nothing(which):
    ps, opt, gen = _mixed(raise_on_nonfinite=True)
    _grads(ps, gen)
    opt.step()
    params, weights, state = _snapshot(opt)
    _grads(ps, gen)
    ps[which].grad[0] = math.inf
    with pytest.raises(FloatingPointError):
        opt.step()
    assert opt.nonfinite_skips == 0
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), weights[i])
        assert _same_state(opt.state[p], state[i])
