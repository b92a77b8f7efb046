"""The parameters the planner counts: from a GPT configuration, a list of shapes or a module."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from ..groups import param_groups
from .shard import Param


@dataclass(frozen=True)
class GPTShape:
    """A decoder-only transformer. Q, K, V and the output projection are separate matrices
    (orthonormalized optimizers treat each projection on its own); ``gated`` gives a SwiGLU MLP
    (gate, up, down), else fc1 / fc2. Column-parallel under TP: Q, K, V, fc1 / gate / up and the
    vocab dim of the embedding and head; row-parallel: the output projection and fc2 / down.
    ``experts`` > 0: every MLP is a mixture of that many experts, stacked as torchtitan's
    GroupedExperts holds them (w1, w3: (E, ffn, d); w2: (E, d, ffn); TP on the ffn dim), with a
    router (E, d); Dion steps each expert as its own matrix, and FSDP's ranks split the experts
    (expert parallelism)."""

    name: str
    d_model: int
    n_layers: int
    vocab: int
    context: int
    ffn: int = 0  # 0: 4 d_model
    n_heads: int = 0  # 0: d_model / 64
    kv_heads: int = 0  # 0: n_heads (multi-head attention); fewer: grouped-query attention
    head_dim: int = 0  # 0: d_model / n_heads
    gated: bool = False
    tied: bool = True  # output head shares the token embedding
    learned_positions: bool = True
    bias: bool = True  # linear and norm biases (GPT-2); False: RMSNorm-style weights only
    itemsize: int = 4
    experts: int = 0

    def params(self) -> list[Param]:
        d, s = self.d_model, self.itemsize
        heads = self.n_heads or d // 64
        kv = self.kv_heads or heads
        hd = self.head_dim or d // heads
        ffn = self.ffn or 4 * d

        def mat(name, out, inp, tp_dim):
            ps = [Param(name, (out, inp), True, tp_dim, s)]
            if self.bias:
                ps.append(Param(name + ".bias", (out,), False, 0 if tp_dim == 0 else None, s))
            return ps

        def norm(name):
            ps = [Param(name + ".weight", (d,), False, None, s)]
            if self.bias:
                ps.append(Param(name + ".bias", (d,), False, None, s))
            return ps

        out = [Param("embed", (self.vocab, d), False, 0, s)]
        if self.learned_positions:
            out.append(Param("pos_embed", (self.context, d), False, None, s))
        for i in range(self.n_layers):
            L = f"layers.{i}."
            out += norm(L + "attn_norm")
            out += mat(L + "q", heads * hd, d, 0)
            out += mat(L + "k", kv * hd, d, 0)
            out += mat(L + "v", kv * hd, d, 0)
            out += mat(L + "o", d, heads * hd, 1)
            out += norm(L + "mlp_norm")
            if self.experts:
                E = self.experts
                out.append(Param(L + "router", (E, d), True, None, s))
                out += [Param(L + "experts.w1", (E, ffn, d), True, 1, s, stacked=True),
                        Param(L + "experts.w3", (E, ffn, d), True, 1, s, stacked=True),
                        Param(L + "experts.w2", (E, d, ffn), True, 2, s, stacked=True)]
            elif self.gated:
                out += mat(L + "gate", ffn, d, 0) + mat(L + "up", ffn, d, 0)
                out += mat(L + "down", d, ffn, 1)
            else:
                out += mat(L + "fc1", ffn, d, 0) + mat(L + "fc2", d, ffn, 1)
        out += norm("final_norm")
        if not self.tied:
            out.append(Param("head", (self.vocab, d), False, 0, s))
        return out


PRESETS = {
    "gpt2-small": GPTShape("gpt2-small", d_model=768, n_layers=12, vocab=50257, context=1024),
    "gpt-3b": GPTShape("gpt-3b", d_model=3072, n_layers=24, vocab=50257, context=2048),
    "llama3-405b": GPTShape(
        "llama3-405b", d_model=16384, n_layers=126, vocab=128256, context=8192, ffn=53248,
        n_heads=128, kv_heads=8, head_dim=128, gated=True, tied=False, learned_positions=False,
        bias=False),
    "mixtral-8x7b": GPTShape(
        "mixtral-8x7b", d_model=4096, n_layers=32, vocab=32000, context=4096, ffn=14336,
        n_heads=32, kv_heads=8, head_dim=128, gated=True, tied=False, learned_positions=False,
        bias=False, experts=8),
}


def params_from_shapes(shapes: Iterable[tuple[int, ...]], itemsize: int = 4,
                       tp_dims: Iterable[int | None] | None = None) -> list[Param]:
    """Every 2-D shape is a Dion / Muon matrix; other shapes are element-wise."""
    shapes = [tuple(int(x) for x in s) for s in shapes]
    dims = list(tp_dims) if tp_dims is not None else [None] * len(shapes)
    return [Param(f"p{i}", s, len(s) == 2, dim, itemsize)
            for i, (s, dim) in enumerate(zip(shapes, dims, strict=True))]


def params_from_module(module: nn.Module, head: nn.Module | None = None,
                       tp_dims: Mapping[str, int] | None = None,
                       flatten: bool = False, stacked=None) -> list[Param]:
    """The parameters of ``module`` sorted as :func:`torchdion.param_groups` sorts them.

    ``tp_dims``: parameter name -> the dim tensor parallelism shards (0 for ColwiseParallel,
    1 for RowwiseParallel). ``stacked``: as for param_groups (names of stacked experts). Sizes
    are the module's full (unsharded) shapes.
    """
    tp_dims = dict(tp_dims or {})
    names = {id(p): n for n, p in module.named_parameters()}
    out = []
    for group in param_groups(module, head=head, flatten=flatten, stacked=stacked):
        for p in group["params"]:
            name = names[id(p)]
            out.append(Param(name, tuple(p.shape), group["algorithm"] == "dion",
                             tp_dims.pop(name, None), p.element_size(),
                             stacked=group.get("stacked", False)))
    if tp_dims:
        raise ValueError(f"tp_dims names no parameter of the module: {sorted(tp_dims)}")
    return out
