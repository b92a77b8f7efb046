"""Invalid hyperparameters, unknown group keys, parameter shapes, and flatten."""

from __future__ import annotations

import math
import re

import pytest
import torch

import torchdion

BAD = {
    "lr": [-0.1, math.nan, math.inf, "0.1", None, True],
    "mu": [-0.1, 1.0, 1.5, math.nan, "0.9"],
    "rank_fraction": [0.0, -0.5, 1.01, math.nan, None],
    "rank_multiple_of": [0, -2, 1.5, True, "4"],
    "weight_decay": [-0.01, math.inf, math.nan, None],
    "betas": [(0.9,), (0.9, 0.95, 0.99), (1.0, 0.95), (0.9, -0.1), (math.nan, 0.9), "ab", 0.9],
    "eps": [-1e-8, math.nan, math.inf, None],
    "power_iters": [0, -1, 1.0, True, None],
    "orthonormalize": ["svd", "QR", None, 1],
    "lr_scale": ["sqrt", 1.0],  # None: the algorithm's default
    "algorithm": ["sgd", "Dion", None],
    "flatten": [1, "yes", None],
    "state_dtype": [torch.int32, torch.bool, "float32", torch.float32.itemsize],
    "nesterov": [1, "yes"],  # None: the algorithm's default
    "polar_q": [0, "no", None],
    "direction_tol": [-0.1, 1.0, math.nan, "0.1", None, True],
}
CASES = [(name, value) for name, values in BAD.items() for value in values]


def _matrix():
    return torch.nn.Parameter(torch.randn(6, 4))


@pytest.mark.parametrize("name,value", CASES, ids=[f"{n}={v!r}" for n, v in CASES])
def test_invalid_in_constructor(name, value):
    with pytest.raises(ValueError, match=rf"^{re.escape(name)} must be"):
        torchdion.Dion([_matrix()], **{name: value})


@pytest.mark.parametrize("name,value", CASES, ids=[f"{n}={v!r}" for n, v in CASES])
def test_invalid_in_param_group(name, value):
    ok_group = {"params": [_matrix()]}
    bad_group = {"params": [_matrix()], name: value}
    with pytest.raises(ValueError, match=rf"param_groups\[1\]\.{re.escape(name)} must be"):
        torchdion.Dion([ok_group, bad_group])
    # add_param_group later validates the same way
    opt = torchdion.Dion([ok_group])
    with pytest.raises(ValueError, match=rf"\.{re.escape(name)} must be"):
        opt.add_param_group(bad_group)
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("seed", [1.5, "0", True, None])
def test_invalid_seed(seed):
    with pytest.raises(ValueError, match=r"^seed must be"):
        torchdion.Dion([_matrix()], seed=seed)


def test_valid_edge_values_accepted():
    torchdion.Dion([_matrix()], lr=0.0, mu=0.0, rank_fraction=1.0, weight_decay=0.0, eps=0.0,
                   betas=[0.0, 0.0], state_dtype=torch.bfloat16)
    torchdion.Dion([_matrix()], lr=torch.tensor(0.01))


def test_unknown_group_key_raises():
    with pytest.raises(ValueError, match="momentum"):
        torchdion.Dion([{"params": [_matrix()], "momentum": 0.9}])
    with pytest.raises(ValueError, match="rank"):
        torchdion.Dion([{"params": [_matrix()], "rank": 4}])
    # keys torch and LR schedulers add are fine
    torchdion.Dion([{"params": [_matrix()], "initial_lr": 0.1, "name": "hidden"}])


@pytest.mark.parametrize("flag", sorted(torchdion.optimizer.FRAMEWORK_FLAGS))
def test_framework_flags_false_or_none_are_ignored_true_raises(flag):
    """torchtitan and others put torch's implementation switches into every group."""
    w, v = _matrix(), _matrix()
    v.data.copy_(w.data)
    opt = torchdion.Dion([{"params": [w], "param_names": ["w"], flag: False},
                          {"params": [torch.nn.Parameter(torch.ones(3))], "param_names": ["b"],
                           flag: None, "algorithm": "adamw"}])
    twin = torchdion.Dion([v])
    w.grad = torch.randn(6, 4)
    v.grad = w.grad.clone()
    opt.step()
    twin.step()
    assert torch.equal(w, v)  # ignored: the same step as without the flag
    assert opt.state_dict()["param_groups"][0][flag] is False
    with pytest.raises(ValueError, match=rf"param_groups\[2\]\.{flag} must be False or None, "
                                         r"got True: Dion"):
        opt.add_param_group({"params": [_matrix()], "param_names": ["x"], flag: True})
    with pytest.raises(ValueError, match=rf"^param_groups\[0\]\.{flag} must be False or None"):
        torchdion.Dion([{"params": [_matrix()], flag: 1}])
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("algorithm", ["dion", "adamw", "lion"])
def test_complex_parameters_refused(algorithm):
    c = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    expected = r"param_groups\[0\]\.params\[1\] must be a real floating-point.*complex64"
    with pytest.raises(ValueError, match=expected):
        torchdion.Dion([{"params": [_matrix(), c], "algorithm": algorithm}])
    opt = torchdion.Dion([_matrix()])
    with pytest.raises(ValueError, match="complex64"):
        opt.add_param_group({"params": [c], "algorithm": algorithm})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("algorithm", ["adamw", "lion"])
def test_vectors_need_elementwise_group(algorithm):
    v = torch.nn.Parameter(torch.randn(5))
    with pytest.raises(ValueError, match="matrix"):
        torchdion.Dion([v])
    with pytest.raises(ValueError, match="matrix"):
        torchdion.Dion([{"params": [_matrix()]}, {"params": [v], "algorithm": "dion"}],
                       algorithm=algorithm)
    s = torch.nn.Parameter(torch.tensor(1.0))
    opt = torchdion.Dion([{"params": [v, s], "algorithm": algorithm}])
    v.grad, s.grad = torch.ones(5), torch.tensor(1.0)
    before = v.detach().clone()
    opt.step()
    assert not torch.equal(v, before)


def test_more_than_two_dims_needs_flatten():
    w = torch.nn.Parameter(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match="flatten"):
        torchdion.Dion([w])
    with pytest.raises(ValueError, match="flatten"):
        torchdion.Dion([{"params": [w], "flatten": False}], flatten=True)
    torchdion.Dion([w], flatten=True)
    torchdion.Dion([{"params": [w], "flatten": True}])
    torchdion.Dion([{"params": [w], "algorithm": "adamw"}])


@pytest.mark.parametrize("shape", [(6, 3, 2, 2), (12, 2, 3), (5, 4, 1, 1)])
@pytest.mark.parametrize("method", ["randomized", "qr"])
def test_flatten_equals_explicit_reshape(shape, method):
    """flatten=True on (out, in, *k) is Dion on the (out, in * prod(k)) matrix, exactly.
    Both parameters are number 0 of their optimizer with the same seed, so Q starts equal."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(shape, generator=gen)
    w4 = torch.nn.Parameter(W.clone())
    w2 = torch.nn.Parameter(W.reshape(shape[0], -1).clone())
    kw = dict(lr=0.05, weight_decay=0.1, rank_fraction=0.5, orthonormalize=method, seed=4)
    opt4 = torchdion.Dion([w4], flatten=True, **kw)
    opt2 = torchdion.Dion([w2], **kw)
    for _ in range(3):
        G = torch.randn(shape, generator=gen)
        w4.grad, w2.grad = G.clone(), G.reshape(shape[0], -1).clone()
        opt4.step()
        opt2.step()
    assert w4.shape == shape
    assert not torch.equal(w4.detach(), W)
    assert torch.equal(w4.detach().reshape(shape[0], -1), w2.detach())
    s4, s2 = opt4.state[w4], opt2.state[w2]
    assert s4["momentum"].shape == shape
    assert torch.equal(s4["momentum"].reshape(shape[0], -1), s2["momentum"])
    assert torch.equal(s4["Q"], s2["Q"])
    b = min(shape[0], math.prod(shape[1:]))
    assert s4["Q"].shape == (b, math.ceil(b / 2))


def test_sparse_gradient_refused_by_name():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = torchdion.Dion([{"params": [emb.weight], "algorithm": "adamw"}])
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*sparse"):
        opt.step()
    assert torch.equal(emb.weight, before)
