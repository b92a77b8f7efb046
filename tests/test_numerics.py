"""Numerics at the rounding level: directions that are rounding noise, values that overflow the
dtype they are written in, and Dion's products in bf16 / fp16 (``matmul_dtype``)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torchdion
from torchdion.update import direction_tolerance

BF16_U = torch.finfo(torch.bfloat16).eps  # 2^-7: unit roundoff of bf16 inputs, doubled


def _one_update(weight: torch.Tensor, grad: torch.Tensor, device="cpu",
                **kw) -> tuple[torch.Tensor, object]:
    """The change one Dion step (lr 1, no decay, no scale) makes to ``weight`` for ``grad``, the
    parameter on ``device``; the change comes back in float64 on the CPU."""
    p = torch.nn.Parameter(weight.to(device, copy=True))
    opt = torchdion.Dion([p], lr=1.0, weight_decay=0.0, lr_scale="none", **kw)
    p.grad = grad.to(device, weight.dtype)
    opt.step()
    return (p.detach().cpu().double() - weight.double()), opt


def _low_rank(shape, rank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape[0], rank, generator=gen, dtype=torch.float64)
            @ torch.randn(rank, shape[1], generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("shape,rank", [((256, 128), 2), ((256, 128), 1), ((96, 320), 1)])
def test_rank_deficient_gradient_fp32_matches_fp64(shape, rank, device):
    """R's columns beyond the gradient's rank are rounding noise; normalized to unit length
    they inflated the fp32 update to singular values of 9 and more (fp64: about 1)."""
    G = _low_rank(shape, rank)
    W = torch.zeros(shape, dtype=torch.float64)
    U64, _ = _one_update(W, G, device)
    U32, _ = _one_update(W.float(), G, device)
    s64, s32 = torch.linalg.svdvals(U64), torch.linalg.svdvals(U32)
    assert s32[0] < 1.5, s32[:4]
    assert s32[rank] < 1e-5 and s64[rank] < 1e-12
    assert (U32 - U64).norm() <= 1e-4 * U64.norm()


def test_direction_tolerance_keeps_every_direction_of_a_full_rank_gradient():
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(64, 32, generator=gen)
    U, _ = _one_update(torch.zeros(64, 32), G)
    assert torch.linalg.matrix_rank(U, rtol=1e-3) == 32


def test_direction_tolerance_formula():
    u32 = torch.finfo(torch.float32).eps
    assert direction_tolerance(256, 128, torch.float32) == pytest.approx(16 * u32 * 256 ** 0.5
                                                                        * 128 ** 0.5)
    assert direction_tolerance(256, 128, torch.float64) < 1e-11
    # bf16 inputs add their own rounding
    assert (direction_tolerance(256, 128, torch.float32, torch.bfloat16)
            > direction_tolerance(256, 128, torch.float32) + BF16_U)


def test_fp16_momentum_overflow_is_a_skipped_step_not_infs_in_the_state(device):
    """Gradients finite in fp16 whose new momentum B - (1 - mu) P R^T is not: nothing is written
    and the step is counted; before, the momentum took infs and every later step was lost."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 32, generator=gen).to(device, torch.float16))
    opt = torchdion.Dion([p], lr=0.01, rank_fraction=0.25)
    skips = 0
    for _ in range(3):
        p.grad = (torch.randn(64, 32, generator=gen) * 3e4).clamp(-6e4, 6e4).to(device,
                                                                                 torch.float16)
        assert p.grad.isfinite().all()
        before = p.detach().clone(), opt.state[p]["momentum"].clone() if opt.state[p] else None
        opt.step()
        assert opt.state[p]["momentum"].isfinite().all()
        assert p.isfinite().all()
        if opt.nonfinite_skips > skips:
            skips = opt.nonfinite_skips
            assert torch.equal(p.detach(), before[0])
            if before[1] is not None:
                assert torch.equal(opt.state[p]["momentum"], before[1])
    assert skips >= 1


def _bf16_pair(shape, rank_fraction, steps=3, seed=0, device="cpu", **kw):
    """The same run with fp32 and with bf16 products: weight changes and final momenta (float64,
    on the CPU)."""
    out = []
    for md in (None, torch.bfloat16):
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(shape, generator=gen)
        p = torch.nn.Parameter(W.to(device, copy=True))
        opt = torchdion.Dion([p], lr=0.1, weight_decay=0.0, rank_fraction=rank_fraction,
                             matmul_dtype=md, **kw)
        for _ in range(steps):
            p.grad = torch.randn(shape, generator=gen).to(device)
            opt.step()
        out.append(((p.detach().cpu() - W).double(), opt.state[p]["momentum"].cpu().double(),
                    opt))
    return out


@pytest.mark.parametrize("shape", [(256, 64), (96, 384)])
@pytest.mark.parametrize("method", ["randomized", "qr"])
def test_bf16_matmuls_agree_with_fp32_within_the_bound(shape, method, device):
    """Bound: each of the four products has two inputs rounded to bf16 (relative error u/2 each,
    u = 2^-7 here); to first order the update moves by at most 4 u relative to its norm, as long
    as the r-th singular value of B stands clear of the next (true for Gaussian gradients at
    rank 1/4; measured about 0.5 u on GPT-2 shapes). Momentum and Q stay fp32."""
    (U32, M32, o32), (U16, M16, o16) = _bf16_pair(shape, 0.25, orthonormalize=method,
                                                  device=device)
    assert (U16 - U32).norm() <= 4 * BF16_U * U32.norm()
    assert (M16 - M32).norm() <= 4 * BF16_U * M32.norm()
    p = o16.param_groups[0]["params"][0]
    assert o16.state[p]["momentum"].dtype == torch.float32
    assert o16.state[p]["Q"].dtype == torch.float32


def test_fp16_matmuls_do_not_overflow_on_large_momentum(device):
    """fp16's range ends at 65504; B is scaled to max |B| = 1 before the cast."""
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(128, 32, generator=gen) * 1e6
    W = torch.zeros(128, 32)
    U32, _ = _one_update(W, G, device, rank_fraction=0.25)
    U16, opt = _one_update(W, G, device, rank_fraction=0.25, matmul_dtype=torch.float16)
    assert opt.nonfinite_skips == 0
    assert (U16 - U32).norm() <= 4 * torch.finfo(torch.float16).eps * U32.norm()


def test_bf16_matmuls_skip_nonfinite_and_keep_zero_momentum_as_fp32_does(device):
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 16, generator=gen).to(device))
    opt = torchdion.Dion([p], lr=0.1, weight_decay=0.1, rank_fraction=0.5,
                         matmul_dtype=torch.bfloat16)
    opt.step()  # state
    W0, Q0 = p.detach().clone(), opt.state[p]["Q"].clone()
    p.grad = torch.zeros(32, 16, device=device)
    opt.step()  # zero momentum and gradient: only the decay, Q kept
    assert torch.equal(opt.state[p]["Q"], Q0)
    torch.testing.assert_close(p.detach(), W0 * (1 - 0.1 * 0.1))
    W1 = p.detach().clone()
    p.grad = torch.randn(32, 16, generator=gen).to(device)
    p.grad[3, 4] = float("nan")
    opt.step()
    assert opt.nonfinite_skips == 1
    assert torch.equal(p.detach(), W1) and torch.equal(opt.state[p]["Q"], Q0)
    assert not opt.state[p]["momentum"].any()


@pytest.mark.parametrize("bad", [torch.int8, torch.float64, "bf16", torch.complex64])
def test_matmul_dtype_is_validated(bad):
    with pytest.raises(ValueError, match="matmul_dtype"):
        torchdion.Dion([torch.nn.Parameter(torch.randn(4, 4))], matmul_dtype=bad)


# ---------------------------------------------------------------- element-wise AdamW / Lion


def _elementwise(algorithm, dtype=torch.float32, **kw):
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3, generator=gen).to(dtype))
    return p, torchdion.Dion([p], algorithm=algorithm, lr=0.01, **kw)


def test_adamw_fp16_small_gradient_moves_the_weights_instead_of_making_them_inf():
    """g^2 = 1e-8 underflows in fp16 and eps = 1e-8 rounds to 0 there: m / 0. The math now runs
    in fp32 whatever the storage dtype."""
    p, opt = _elementwise("adamw", torch.float16)
    W = p.detach().clone()
    for _ in range(2):
        p.grad = torch.full((4, 3), 1e-4, dtype=torch.float16)
        opt.step()
    assert p.isfinite().all() and opt.nonfinite_skips == 0
    assert (p.detach().float() < W.float()).all()  # moved against the gradient, by about lr


@pytest.mark.parametrize("algorithm", ["adamw", "lion"])
def test_elementwise_overflowing_state_is_a_skip_not_a_stuck_inf(algorithm):
    """g = 1e20: g^2 (AdamW) overflows fp32; inf in exp_avg_sq would freeze the element."""
    p, opt = _elementwise(algorithm)
    opt.step()
    W, state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if k != "step"}
    p.grad = torch.ones(4, 3)
    p.grad[1, 2] = 1e20 if algorithm == "adamw" else float("inf")
    opt.step()
    assert opt.nonfinite_skips == 1
    assert torch.equal(p.detach(), W)
    for k, v in state.items():
        assert torch.equal(opt.state[p][k], v), k
    p.grad = torch.ones(4, 3)
    opt.step()
    assert opt.nonfinite_skips == 1 and (p.detach() != W).all()


@pytest.mark.parametrize("algorithm", ["adamw", "lion"])
def test_elementwise_nan_state_from_a_checkpoint_never_reaches_the_weights(algorithm):
    p, opt = _elementwise(algorithm)
    opt.step()
    opt.state[p]["exp_avg"][0, 0] = float("nan")
    W = p.detach().clone()
    p.grad = torch.ones(4, 3)
    opt.step()
    assert opt.nonfinite_skips == 1 and torch.equal(p.detach(), W)


def test_elementwise_raise_on_nonfinite_raises_before_any_write():
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(6, 4, generator=gen)), torch.nn.Parameter(torch.randn(5))]
    opt = torchdion.Dion([{"params": ps[:1]}, {"params": ps[1:], "algorithm": "adamw"}],
                         raise_on_nonfinite=True)
    opt.step()
    before = [p.detach().clone() for p in ps], [dict(opt.state[p]) for p in ps]
    ps[0].grad = torch.randn(6, 4, generator=gen)
    ps[1].grad = torch.full((5,), 1e20)
    with pytest.raises(FloatingPointError):
        opt.step()
    assert all(torch.equal(p.detach(), w) for p, w in zip(ps, before[0]))
    assert [opt.state[p]["step"] for p in ps] == [s["step"] for s in before[1]]


# ---------------------------------------------------------------- no host synchronization


class _NoHostReads(TorchDispatchMode):
    """Fails on every read of a tensor's value by the host that passes through the dispatcher
    (item, bool, int, float, comparisons in ``if``: all end in aten._local_scalar_dense)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("the step read a tensor's value on the host")
        return func(*args, **(kwargs or {}))


def _no_tolist(self, *args, **kwargs):  # .tolist() and .numpy() bypass the dispatcher
    raise AssertionError("the step read a tensor's values on the host")


@contextlib.contextmanager
def _cuda_syncs_raise(device: torch.device):
    """On CUDA, torch's own check as well: every synchronizing call raises (the caching
    allocator's included). Nothing on the CPU."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("matmul_dtype", [None, torch.bfloat16])
def test_step_reads_nothing_back_from_the_device(monkeypatch, matmul_dtype, device):
    """In the steady state, with a non-finite gradient among the others, every decision (skip,
    zero momentum, Cholesky shift) is made on the device; the skips are counted there too."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(24, 8), (8, 24), (16, 16), (12,), (5,), (12, 6), (12, 6), (6, 10)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    opt = torchdion.Dion([{"params": ps[:3], "rank_fraction": 0.5},
                          {"params": [ps[3]], "algorithm": "adamw"},
                          {"params": [ps[4]], "algorithm": "lion"},
                          {"params": ps[5:7], "algorithm": "dion2", "rank_fraction": 0.5},
                          {"params": [ps[7]], "algorithm": "muon", "nesterov": True}],
                         lr=0.05, matmul_dtype=matmul_dtype)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        opt.step()
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    ps[2].grad = torch.zeros(16, 16, device=device)
    opt.state[ps[2]]["momentum"].zero_()  # no direction: no update, Q kept
    ps[0].grad[1, 1] = float("nan")
    ps[3].grad[0] = float("inf")
    ps[5].grad[2, 3] = float("nan")  # Dion2: this matrix skipped, its batch-mate stepped
    before = [p.detach().clone() for p in ps]
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", _no_tolist)
        m.setattr(torch.Tensor, "numpy", _no_tolist)
        with _NoHostReads(), _cuda_syncs_raise(ps[0].device):
            opt.step()
    assert opt.nonfinite_skips == 3
    assert torch.equal(ps[0].detach(), before[0]) and torch.equal(ps[3].detach(), before[3])
    assert torch.equal(ps[5].detach(), before[5])
    assert not torch.equal(ps[6].detach(), before[6])
    assert not torch.equal(ps[7].detach(), before[7])
    assert not torch.equal(ps[1].detach(), before[1])
    assert not torch.equal(ps[4].detach(), before[4])
    assert all(p.isfinite().all() for p in ps)
