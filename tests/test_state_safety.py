"""Loads, copies and hyperparameter changes either apply whole or raise before any write
(issue 10 items 5, 6 and 7)."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch

import torchdion


def _trained(steps=2):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(8, 6, generator=gen)),
          torch.nn.Parameter(torch.randn(5, generator=gen))]
    opt = torchdion.Dion([{"params": ps[:1], "rank_fraction": 0.5},
                          {"params": ps[1:], "algorithm": "adamw"}], lr=0.05)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return ps, opt


def _frozen(ps, opt):
    """Everything a failed call must leave as it was."""
    groups = [{k: ([id(p) for p in v] if k == "params" else copy.deepcopy(v))
               for k, v in g.items()} for g in opt.param_groups]
    state = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                     for k, v in s.items()} for p, s in opt.state.items()}
    return groups, state, [p.detach().clone() for p in ps], opt.nonfinite_skips


def _assert_unchanged(before, ps, opt):
    assert _same(before, _frozen(ps, opt))


def _same(a, b):
    (ga, sa, wa, ka), (gb, sb, wb, kb) = a, b
    if ga != gb or ka != kb or sa.keys() != sb.keys():
        return False
    if not all(torch.equal(x, y) for x, y in zip(wa, wb)):
        return False
    return all(sa[p].keys() == sb[p].keys() and all(
        torch.equal(v, sb[p][k]) if isinstance(v, torch.Tensor) else v == sb[p][k]
        for k, v in sa[p].items()) for p in sa)


# ----------------------------------------------------------------- item 5: loads


def _edited(edit):
    ps, src = _trained()
    sd = copy.deepcopy(src.state_dict())
    edit(sd)
    return sd


def _foreign(sd):
    """A torch.optim.AdamW state dict over the same parameters."""
    ps, _ = _trained()
    adamw = torch.optim.AdamW([{"params": ps[:1]}, {"params": ps[1:]}])
    for p in ps:
        p.grad = torch.ones_like(p)
    adamw.step()
    sd.clear()
    sd.update(adamw.state_dict())


def _nested(key, sub, value):
    def edit(sd):
        if value is None:
            del sd[key][sub[0]][sub[1]]
        else:
            sd[key][sub[0]][sub[1]] = value(sd[key][sub[0]][sub[1]])
    return edit


BAD_LOADS = {
    "foreign AdamW": (_foreign, r"param_groups\[0\]: unknown parameter group key.*amsgrad"),
    "no Q": (_nested("state", (0, "Q"), None), r"parameter param_groups\[0\]\['params'\]\[0\] "
                                                r"\(shape \(8, 6\)\) has keys \['momentum', "
                                                r"'step'\], expected \['Q', 'momentum', 'step'\]"),
    "no momentum": (_nested("state", (0, "momentum"), None), r"expected \['Q', 'momentum'"),
    "no exp_avg_sq": (_nested("state", (1, "exp_avg_sq"), None),
                      r"param_groups\[1\]\['params'\]\[0\].*exp_avg_sq"),
    "no mu": (_nested("param_groups", (0, "mu"), None), None),  # completed: loads
    "mu 1.5": (_nested("param_groups", (0, "mu"), lambda v: 1.5),
               r"state_dict param_groups\[0\]\.mu must be in \[0, 1\)"),
    "lr -1": (_nested("param_groups", (1, "lr"), lambda v: -1.0),
              r"state_dict param_groups\[1\]\.lr must be"),
    "Q a list": (_nested("state", (0, "Q"), lambda v: v.tolist()),
                 r"\['params'\]\[0\] .*Q must be a floating-point tensor, got list"),
    "step a string": (_nested("state", (0, "step"), lambda v: "2"), r"step must be an int"),
    "not a dict": (lambda sd: sd.pop("state"), r"state_dict must be a dict with 'state'"),
}


@pytest.mark.parametrize("case", list(BAD_LOADS))
def test_bad_state_dict_changes_nothing(case):
    edit, pattern = BAD_LOADS[case]
    sd = _edited(edit)
    ps, opt = _trained(steps=1)
    opt.param_groups[0]["lr"] = 0.123  # the saved lr (0.05) must not arrive on a failed load
    before = _frozen(ps, opt)
    if pattern is None:  # a key the checkpoint lacks keeps this optimizer's value
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["mu"] == 0.95 and opt.param_groups[0]["lr"] == 0.05
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        return
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(sd)
    _assert_unchanged(before, ps, opt)


# ----------------------------------------------------------------- item 6: copies


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_keep_settings_and_step_like_the_original(how):
    ps, opt = _trained()
    opt.nonfinite_skips = 3
    opt.seed = 11  # only its presence matters here: the copy keeps it
    if how == "deepcopy":
        ps2, opt2 = copy.deepcopy((ps, opt))
    elif how == "pickle":
        ps2, opt2 = pickle.loads(pickle.dumps((ps, opt)))
    else:
        buf = io.BytesIO()
        torch.save((ps, opt), buf)
        buf.seek(0)
        ps2, opt2 = torch.load(buf, weights_only=False)
    assert (opt2.seed, opt2.nonfinite_skips, opt2.replicate_group) == (11, 3, None)
    assert opt2.defaults == opt.defaults
    for p, q in zip(ps, ps2):
        g = torch.full(p.shape, 0.5)
        p.grad, q.grad = g, g.clone()
    opt.step()
    opt2.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, ps2))


def test_copy_with_a_process_group_is_refused_at_copy_time():
    ps, opt = _trained()
    opt.replicate_group = object()  # stands for a ProcessGroup (no process group needed here)
    with pytest.raises(TypeError, match="replicate_group cannot be copied or pickled.*state_dict"):
        copy.deepcopy(opt)
    with pytest.raises(TypeError, match="process group"):
        pickle.dumps(opt)


# ----------------------------------------------------------------- item 7: changed groups


@pytest.mark.parametrize("key,value,pattern", [
    ("lr", math.nan, r"param_groups\[0\]\.lr must be a finite number"),
    ("lr", 1e300 * 1e10, r"param_groups\[0\]\.lr must be"),
    ("lr", 1e300, r"param_groups\[0\]\.lr=1e\+300 overflows torch.float32 .*\['params'\]\[0\]"),
    ("lr", -0.1, r"param_groups\[0\]\.lr must be"),
    ("mu", 1.0, r"param_groups\[0\]\.mu must be"),
    ("betas", (0.9,), r"param_groups\[0\]\.betas must be"),
    ("rank_fraction", 1.0, r"rank_fraction / rank_multiple_of changed after its first step"),
    ("algorithm", "adamw", r"param_groups\[0\]\.algorithm is 'adamw'.*another algorithm"),
    ("momentum", 0.9, r"param_groups\[0\]: unknown parameter group key"),
])
def test_group_changed_between_steps_is_checked_before_any_write(key, value, pattern):
    ps, opt = _trained()
    opt.param_groups[0][key] = value
    for p in ps:
        p.grad = torch.ones_like(p)
    before = _frozen(ps, opt)
    with pytest.raises(ValueError, match=pattern):
        opt.step()
    _assert_unchanged(before, ps, opt)


def test_a_change_that_can_take_effect_is_honoured():
    """orthonormalize and lr may change between steps; the plan follows."""
    ps, opt = _trained()
    opt.param_groups[0]["orthonormalize"] = "qr"
    opt.param_groups[0]["lr"] = 0.0
    opt.param_groups[0]["weight_decay"] = 0.0
    w = ps[0].detach().clone()
    ps[0].grad = torch.ones_like(ps[0])
    opt.step()
    assert opt.plan(ps[0], opt.param_groups[0]).sketch_rows == 0
    assert torch.equal(ps[0], w)  # lr 0: the weights do not move
