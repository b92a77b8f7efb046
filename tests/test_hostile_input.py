"""Hostile input: fuzzed hyperparameters and group dicts, failed adds and loads that change
nothing, groups added after steps, empty and 1-element matrices.

The fuzzing checks the optimizer against an oracle written here from the documented ranges
(Dion's docstring), not against the optimizer's own validation code.
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from helpers import dion_and_reference, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchdion

NAMES = ("lr", "mu", "rank_fraction", "rank_multiple_of", "weight_decay", "betas", "eps",
         "power_iters", "orthonormalize", "lr_scale", "algorithm", "flatten", "state_dtype",
         "nesterov", "polar_q", "direction_tol", "stacked", "matmul_dtype", "ns_steps")
CHOICES = {"orthonormalize": ("qr", "cholesky", "randomized"),
           "lr_scale": ("spectral", "rms", "muon", "none"),
           "algorithm": ("dion", "dion2", "muon", "adamw", "lion")}
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32,
          torch.int64, torch.bool, torch.complex64, torch.uint8)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def valid(name: str, x) -> bool:
    """The documented range of each hyperparameter."""
    if name == "lr":
        if isinstance(x, torch.Tensor):
            return (x.numel() == 1 and x.dtype != torch.bool and not x.is_complex()
                    and math.isfinite(float(x)) and float(x) >= 0)
        return _number(x) and x >= 0
    if name == "mu":
        return _number(x) and 0 <= x < 1
    if name == "rank_fraction":
        return _number(x) and 0 < x <= 1
    if name in ("rank_multiple_of", "power_iters", "ns_steps"):
        return _int(x) and x >= 1
    if name in ("weight_decay", "eps"):
        return _number(x) and x >= 0
    if name == "betas":
        return (isinstance(x, (tuple, list)) and len(x) == 2
                and all(_number(b) and 0 <= b < 1 for b in x))
    if name in ("lr_scale", "nesterov") and x is None:  # the algorithm's default
        return True
    if name in CHOICES:
        return isinstance(x, str) and x in CHOICES[name]
    if name in ("flatten", "stacked", "nesterov", "polar_q"):
        return isinstance(x, bool)
    if name == "direction_tol":
        return _number(x) and 0 <= x < 1
    if name == "state_dtype":
        return x is None or (isinstance(x, torch.dtype) and x.is_floating_point)
    if name == "matmul_dtype":
        return x is None or x in (torch.bfloat16, torch.float16, torch.float32)
    raise AssertionError(name)


FLOATS = st.floats(allow_nan=True, allow_infinity=True)
ANYTHING = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 5), st.integers(), FLOATS,
    st.floats(-0.5, 1.5), st.text(max_size=10),
    st.sampled_from([s for c in CHOICES.values() for s in c] + ["QR", "Dion", "svd", ""]),
    st.tuples(FLOATS, FLOATS), st.tuples(st.floats(0, 1), st.floats(0, 1)),
    st.lists(st.floats(0, 1), max_size=3), st.sampled_from(DTYPES),
    st.builds(torch.tensor, FLOATS), st.lists(st.floats(0, 1), min_size=2, max_size=3).map(
        torch.tensor),
    st.builds(torch.tensor, st.integers(0, 3)), st.complex_numbers(max_magnitude=2),
)


def _matrix(seed=0, shape=(6, 4)):
    return torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))


def _named(message: str, prefix: str = "") -> str | None:
    m = re.match(rf"^{re.escape(prefix)}(\w+) must be", message)
    return m.group(1) if m else None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(NAMES), ANYTHING, min_size=1, max_size=4))
def test_fuzzed_constructor_arguments(kwargs):
    bad = {k for k, v in kwargs.items() if not valid(k, v)}
    if not bad:
        p = _matrix()
        torchdion.Dion([p], **kwargs)  # construction never steps: no cost from huge values
        return
    with pytest.raises(ValueError) as info:
        torchdion.Dion([_matrix()], **kwargs)
    assert _named(str(info.value)) in bad, (str(info.value), bad)


def _trained(seed=0, **kw):
    """An optimizer with a Dion and an AdamW group, stepped twice (state exists)."""
    gen = torch.Generator().manual_seed(seed)
    ps = [_matrix(1), _matrix(2, (3, 7)), torch.nn.Parameter(torch.randn(5, generator=gen))]
    opt = torchdion.Dion([{"params": ps[:2]}, {"params": ps[2:], "algorithm": "adamw"}],
                         lr=0.05, rank_fraction=0.5, **kw)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return ps, opt, gen


def _snapshot(opt):
    params = [p for g in opt.param_groups for p in g["params"]]
    groups = [{k: (list(map(id, v)) if k == "params" else copy.deepcopy(v)) for k, v in g.items()}
              for g in opt.param_groups]
    state = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                     for k, v in opt.state[p].items()} for p in opt.state}
    return dict(weights=[p.detach().clone() for p in params], groups=groups, state=state,
                attrs=sorted(vars(opt)), layouts=sorted(map(id, opt._plans)),
                skips=opt.nonfinite_skips)


def _assert_same(a, b):
    assert a["groups"] == b["groups"]
    assert a["attrs"] == b["attrs"] and a["layouts"] == b["layouts"] and a["skips"] == b["skips"]
    assert len(a["weights"]) == len(b["weights"])
    assert all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"]))
    assert a["state"].keys() == b["state"].keys()
    for key, s in a["state"].items():
        t = b["state"][key]
        assert s.keys() == t.keys()
        for k in s:
            assert (torch.equal(s[k], t[k]) if isinstance(s[k], torch.Tensor) else s[k] == t[k])


def _step_both(ps, opt, qs, twin, gen):
    """One step of two optimizers over their own (equal) parameters, same gradients."""
    for p, q in zip(ps, qs):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()
    opt.step()
    twin.step()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.one_of(st.sampled_from(NAMES), st.text(min_size=1, max_size=8)),
                       ANYTHING, min_size=1, max_size=4),
       st.sampled_from([(5, 3), (0, 4), (4, 0), (6,), (2, 3, 2)]))
def test_fuzzed_group_that_fails_changes_nothing(group, shape):
    """A rejected add_param_group names the bad key and leaves the optimizer as it was: the
    next step equals the step of a twin that never saw the bad group."""
    unknown = {k for k in group if k not in NAMES and k not in ("params", "name", "initial_lr",
                                                                  "param_names")}
    group.pop("params", None)
    group.pop("param_names", None)
    bad = {k for k, v in group.items() if k in NAMES and not valid(k, v)}
    matrix = group.get("algorithm", "dion") in ("dion", "dion2", "muon")
    flatten, stacked = group.get("flatten", False) is True, group.get("stacked", False) is True
    # stacked excludes flatten, and is Dion's only: refused already for the good matrix [0]
    combo_bad = matrix and stacked and (flatten or group.get("algorithm", "dion") != "dion")
    shape_bad = matrix and (len(shape) == 1 or 0 in shape
                            or (len(shape) > 2 and not flatten and not stacked))
    if not unknown and not bad and not combo_bad and not shape_bad:
        return  # a valid group: covered by test_group_added_after_steps_trains
    ps, opt, _ = _trained()
    twin_ps, twin, _ = _trained()
    before = _snapshot(opt)
    # a good matrix first: its layout is computed (and cached) before the bad one fails
    good, new = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(shape))
    with pytest.raises(ValueError) as info:
        opt.add_param_group({"params": [good, new], **group})
    msg = str(info.value)
    if unknown:
        assert msg.startswith("unknown parameter group key"), msg
        assert any(repr(k) in msg for k in unknown), msg
    elif bad:
        assert _named(msg, "param_groups[2].") in bad, (msg, bad)
    elif combo_bad:
        assert "parameter param_groups[2]['params'][0]" in msg, msg
    else:
        assert "Dion parameter param_groups[2]['params'][1]" in msg, msg
    _assert_same(before, _snapshot(opt))
    gen = torch.Generator().manual_seed(7)
    _step_both(ps, opt, twin_ps, twin, gen)
    assert all(torch.equal(p, q) for p, q in zip(ps, twin_ps))


def test_repeated_parameter_is_refused():
    w = _matrix()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own duplicate warning
        with pytest.raises(ValueError, match=r"param_groups\[0\]\.params lists a parameter"):
            torchdion.Dion([w, w])
        ps, opt, _ = _trained()
        before = _snapshot(opt)
        with pytest.raises(ValueError, match=r"param_groups\[2\]\.params"):
            opt.add_param_group({"params": [w, w], "algorithm": "adamw"})
    _assert_same(before, _snapshot(opt))


def test_parameter_already_in_a_group_changes_nothing():
    ps, opt, _ = _trained()
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [ps[0]]})
    _assert_same(before, _snapshot(opt))


@pytest.mark.parametrize("algorithm,shape", [("dion", (8, 5)), ("adamw", (7,)),
                                             ("lion", (3, 4))])
def test_group_added_after_steps_trains(algorithm, shape):
    """The new group's parameters get state and train; the old ones go on exactly as in a twin
    that never had the new group."""
    ps, opt, _ = _trained()
    twin_ps, twin, _ = _trained()
    before = _snapshot(opt)
    new = torch.nn.Parameter(torch.randn(shape))
    x0 = new.detach().clone()
    opt.add_param_group({"params": [new], "algorithm": algorithm, "lr": 0.1})
    assert opt.param_groups[-1]["lr"] == 0.1 and opt.param_groups[-1]["mu"] == 0.95
    for key, s in before["state"].items():  # adding touched no state
        p = next(p for p in ps if id(p) == key)
        assert all(torch.equal(v, opt.state[p][k]) if isinstance(v, torch.Tensor)
                   else v == opt.state[p][k] for k, v in s.items())
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, q in zip(ps, twin_ps):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        new.grad = torch.randn(shape, generator=gen)
        opt.step()
        twin.step()
    assert opt.state[new]["step"] == 3
    assert not torch.equal(new.detach(), x0) and torch.isfinite(new).all()
    if algorithm == "dion":
        assert opt.state[new]["Q"].shape == (5, 3)  # rank_fraction 0.5 of 5, from the defaults
    for p, q in zip(ps, twin_ps):
        assert torch.equal(p, q)
        assert all(torch.equal(v, twin.state[q][k]) if isinstance(v, torch.Tensor)
                   else v == twin.state[q][k] for k, v in opt.state[p].items())


# ----------------------------------------------------------------- load_state_dict


def _loaded_into(target_shapes, **kw):
    """A saved state dict from _trained() and an optimizer over ``target_shapes`` (Dion group,
    then one AdamW vector of 5), stepped once so that it has state of its own."""
    _, src, _ = _trained()
    sd = src.state_dict()
    gen = torch.Generator().manual_seed(5)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in target_shapes]
    opt = torchdion.Dion([{"params": ps[:-1]}, {"params": ps[-1:], "algorithm": "adamw"}],
                         lr=0.2, rank_fraction=kw.pop("rank_fraction", 0.5), **kw)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    return sd, ps, opt


@pytest.mark.parametrize("shapes,pattern", [
    ([(6, 4), (3, 8), (5,)], r"momentum of parameter param_groups\[0\]\['params'\]\[1\] "
                             r"\(shape \(3, 8\)\) has shape \(3, 7\)"),
    ([(6, 4), (3, 7), (4,)], r"exp_avg of parameter param_groups\[1\]\['params'\]\[0\]"),
    ([(6, 4), (5,)], r"param_groups\[0\] has 2 parameters, this optimizer's has 1"),
    ([(6, 4), (3, 7), (2, 2), (5,)], r"param_groups\[0\] has 2 parameters, .* has 3"),
])
def test_load_mismatched_shapes_or_counts_changes_nothing(shapes, pattern):
    sd, ps, opt = _loaded_into(shapes)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(sd)
    _assert_same(before, _snapshot(opt))
    assert opt.param_groups[0]["lr"] == 0.2  # the saved lr (0.05) was not loaded either


def test_load_with_other_rank_fraction_changes_nothing():
    sd, ps, opt = _loaded_into([(6, 4), (3, 7), (5,)], rank_fraction=1.0)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"Q of parameter param_groups\[0\]\['params'\]\[0\] "
                                         r"\(shape \(6, 4\)\) has shape \(4, 2\), expected "
                                         r"\(4, 4\).*rank_fraction"):
        opt.load_state_dict(sd)
    _assert_same(before, _snapshot(opt))


def test_load_with_other_group_count_or_algorithm_changes_nothing():
    _, src, _ = _trained()
    sd = src.state_dict()
    a, b, v = _matrix(1), _matrix(2, (3, 7)), torch.nn.Parameter(torch.randn(5))
    one_group = torchdion.Dion([a, b, v], algorithm="adamw")
    before = _snapshot(one_group)
    with pytest.raises(ValueError, match="state_dict has 2 parameter groups, this optimizer has 1"):
        one_group.load_state_dict(sd)
    _assert_same(before, _snapshot(one_group))
    # same counts and shapes, but the first group is AdamW here: its state would be Dion's
    swapped = torchdion.Dion([{"params": [a, b], "algorithm": "lion"},
                              {"params": [v], "algorithm": "adamw"}])
    before = _snapshot(swapped)
    with pytest.raises(ValueError, match=r"param_groups\[0\] has algorithm='dion', this "
                                         r"optimizer's has 'lion'"):
        swapped.load_state_dict(sd)
    _assert_same(before, _snapshot(swapped))


# ----------------------------------------------------------------- empty and 1-element dims


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0), (0, 3, 2)])
def test_empty_matrix_in_dion_group_is_refused_at_construction(shape):
    """Decision: an empty matrix in a Dion group is an error at construction (nothing to
    orthonormalize, and sqrt(m / n) would divide by zero), naming the parameter and the fix."""
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] .*empty matrix.*"
                                         r"algorithm='adamw'"):
        torchdion.Dion([_matrix(), torch.nn.Parameter(torch.zeros(shape))], flatten=True)


def test_param_groups_puts_empty_matrices_in_the_elementwise_group():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 0))
    groups = torchdion.param_groups(model)
    dion = next(g for g in groups if g["algorithm"] == "dion")
    assert [tuple(p.shape) for p in dion["params"]] == [(6, 4)]
    opt = torchdion.Dion(groups, lr=0.1)
    x = torch.randn(8, 4)
    for _ in range(2):
        h = model[0](x)
        loss = h.square().mean() + model[1](h).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert opt.nonfinite_skips == 0
    assert all(opt.state[p]["step"] == 2 for p in model.parameters())


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (5, 1)])
@pytest.mark.parametrize("method", ["qr", "cholesky", "randomized"])
def test_one_element_dims_match_reference(shape, method):
    opt, p, ref, gen = dion_and_reference(*shape, 1, method, lr=0.1, mu=0.9)
    for _ in range(4):
        G = torch.randn(shape, generator=gen, dtype=torch.float64)
        p.grad = G.clone()
        opt.step()
        ref.step(G)
    assert opt.nonfinite_skips == 0
    assert rel_err(p, ref.X) < 1e-10
    assert rel_err(opt.state[p]["momentum"], ref.momentum) < 1e-10


def test_workspace_hands_out_an_empty_block_first():
    """An empty local block (an FSDP rank holding no rows of a matrix) taken first on the first
    step: the workspace has no previous size for its dtype yet."""
    from torchdion.update import Workspace

    ws = Workspace()
    for _ in range(2):
        ws.begin()
        assert ws.take((1, 0, 5), torch.float32, "cpu").shape == (1, 0, 5)
        assert ws.take((2, 4, 3), torch.float32, "cpu").shape == (2, 4, 3)
