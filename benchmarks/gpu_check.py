"""CUDA checks for the prepared GPU run (benchmarks/gpu_check.sh): equivalence and host syncs.

1. Dion on CUDA against the same steps on CPU in fp64, for fp32 and TF32 matmuls and for
   ``matmul_dtype=torch.bfloat16`` (bound: 4 u_bf16 of the update's norm, as in
   tests/test_numerics.py), a non-finite gradient skipped, and AdamW / Lion element-wise groups.
2. Host synchronizations per steady-state step, counted with
   ``torch.cuda.set_sync_debug_mode("warn")`` (each sync the CUDA caching allocator or a
   ``.item()`` / ``.tolist()`` / ``bool()`` on a CUDA tensor makes raises one warning).

Writes one JSON object to ``--out`` and prints it. Exit status 1 when a check fails.

    python benchmarks/gpu_check.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

import torchdion

BF16_U = torch.finfo(torch.bfloat16).eps


def _run(device, dtype, steps, shapes, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
             for _ in range(steps)]
    params = [torch.nn.Parameter(p.detach().to(device, dtype, copy=True)) for p in ps]
    opt = torchdion.Dion([{"params": params[:-2]},
                          {"params": [params[-2]], "algorithm": "adamw"},
                          {"params": [params[-1]], "algorithm": "lion"}],
                         lr=0.05, rank_fraction=0.25, **kw)
    for g in grads:
        for p, gi in zip(params, g):
            p.grad = gi.to(device, dtype)
        opt.step()
    return [p.detach().double().cpu() - w.detach() for p, w in zip(params, ps)], opt


def equivalence(device) -> dict:
    shapes = [(256, 64), (96, 384), (512, 512), (64,), (32,)]
    ref, _ = _run("cpu", torch.float64, 3, shapes)
    out = {}
    for name, kw, tf32, bound in [
        ("fp32", {}, False, 1e-3),
        ("tf32", {}, True, 4 * 2.0 ** -10),
        ("bf16 matmuls", {"matmul_dtype": torch.bfloat16}, False, 4 * BF16_U),
    ]:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        got, _ = _run(device, torch.float32, 3, shapes, **kw)
        torch.backends.cuda.matmul.allow_tf32 = False
        rel = max(float((g - r).norm() / r.norm()) for g, r in zip(got[:3], ref[:3]))
        rel_ew = max(float((g - r).norm() / r.norm()) for g, r in zip(got[3:], ref[3:]))
        out[name] = {"dion_max_relative_difference": rel, "bound": bound,
                     "elementwise_max_relative_difference": rel_ew,
                     "ok": rel <= bound and rel_ew <= 1e-4}
    # a non-finite gradient: that parameter is skipped, the others step
    p = [torch.nn.Parameter(torch.randn(64, 32, device=device)) for _ in range(2)]
    opt = torchdion.Dion(p, lr=0.1)
    opt.step()
    w = [q.detach().clone() for q in p]
    p[0].grad = torch.randn(64, 32, device=device)
    p[0].grad[1, 1] = float("nan")
    p[1].grad = torch.randn(64, 32, device=device)
    opt.step()
    out["nonfinite"] = {"skips": opt.nonfinite_skips,
                        "ok": opt.nonfinite_skips == 1 and torch.equal(p[0].detach(), w[0])
                        and not torch.equal(p[1].detach(), w[1])}
    return out


def host_syncs(device) -> dict:
    """Warnings raised by sync-debug mode in one steady-state step (after two warm-up steps)."""
    out = {}
    # polar_q's eigendecomposition may check its result on the host (torch.linalg.eigh): counted
    # here rather than assumed
    for name, kw in [("fp32", {}), ("bf16 matmuls", {"matmul_dtype": torch.bfloat16}),
                     ("nesterov + polar_q", {"nesterov": True, "polar_q": True}),
                     ("muon", {"algorithm": "muon", "nesterov": True})]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device))
                  for s in [(768, 768), (3072, 768), (768,)]]
        opt = torchdion.Dion([{"params": params[:2], "rank_fraction": 0.25},
                              {"params": params[2:], "algorithm": "adamw"}], lr=0.01, **kw)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        opt.step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        where = sorted({str(w.message).splitlines()[0][:120] for w in caught})
        out[name] = {"syncs_per_step": len(caught), "messages": where[:10]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the checks (no sync count)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    res = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "equivalence": equivalence(device),
           "host_syncs": host_syncs(device) if device.type == "cuda" else "not counted on cpu"}
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if all(v["ok"] for v in res["equivalence"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
