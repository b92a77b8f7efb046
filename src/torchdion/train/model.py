"""A small pre-norm GPT: causal self-attention and MLP blocks, learned positions, untied head.

With ``n_expert`` > 0 each MLP is a mixture of experts: a router picks the top ``top_k`` of
``n_expert`` experts per token, and the experts' weights are stacked, (E, hidden, d) and
(E, d, hidden), the layout Dion steps as E separate matrices (``stacked=True``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int
    seq_len: int = 128
    n_layer: int = 6
    n_head: int = 6
    d_model: int = 192
    mlp_ratio: int = 4
    n_expert: int = 0  # 0: a dense MLP
    top_k: int = 2


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by n_head {cfg.n_head}")
        self.head_dim = cfg.d_model // cfg.n_head
        # Separate q, k, v matrices: each is a square matrix for the optimizer, where a fused
        # (3d, d) weight would be orthonormalized as one matrix mixing three roles.
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # Heads are counted from q's width: under tensor parallelism each rank holds a slice of
        # the heads (column-sharded q, k, v), and proj takes the matching slice of its input.
        q, k, v = (w(x).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
                   for w in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).flatten(2))


class MoE(nn.Module):
    """Top-k routing over stacked experts, each a GELU MLP of the dense one's width.

    Expert parallelism (``expert_parallel``): each process holds a contiguous share of the
    experts. The tokens of all processes and their routing are gathered, each process runs its
    experts on the tokens routed to them, and the outputs are summed back to the tokens' owners
    (a reduce-scatter): the all-gather token dispatch, simpler than an all-to-all and exact.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.d_model
        self.top_k = min(cfg.top_k, cfg.n_expert)
        self.router = nn.Linear(cfg.d_model, cfg.n_expert, bias=False)
        self.w_in = nn.Parameter(torch.empty(cfg.n_expert, hidden, cfg.d_model))
        self.w_out = nn.Parameter(torch.empty(cfg.n_expert, cfg.d_model, hidden))
        self.group = None  # the expert-parallel process group, once sharded

    def expert_parallel(self, group) -> None:
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        top = self.router(x).topk(self.top_k, dim=-1)
        gates, experts = top.values.softmax(-1), top.indices
        w_in, w_out, first = self.w_in, self.w_out, 0
        if self.group is not None:
            x, gates, experts, first = _gather_tokens(x, gates, experts, self.w_in, self.group)
            w_in, w_out = (_grad_scale(w.to_local(), 1 / dist.get_world_size(self.group))
                           for w in (self.w_in, self.w_out))
        y = torch.zeros_like(x)
        for e in range(w_in.shape[0]):  # the experts held here; a grouped matmul on GPUs
            token, slot = (experts == first + e).nonzero(as_tuple=True)
            if token.numel():
                h = F.gelu(x[token] @ w_in[e].T) @ w_out[e].T
                y = y.index_add(0, token, h * gates[token, slot, None])
        if self.group is not None:
            y = _scatter_tokens(y, self.group)
        return y.reshape(shape)


def _gather_tokens(x, gates, experts, w_in, group):
    """Every process's tokens, gates and expert choices, in rank order; and the index of the
    first expert held here (the local shard of the (E, ...) DTensor ``w_in``)."""
    # differentiable: the backward of an all-gather is a reduce-scatter of the gradients
    x_all, gates_all = (_collective("all_gather", True)(t, 0, group) for t in (x, gates))
    experts_all = _collective("all_gather", False)(experts, 0, group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    first = min(rank * -(-w_in.shape[0] // world), w_in.shape[0])  # torch.chunk's split
    return x_all, gates_all, experts_all, first


def _scatter_tokens(y, group):
    """The sum over processes of ``y``, keeping this process's rows (its own tokens)."""
    return _collective("reduce_scatter", True)(y, "sum", 0, group)


def _collective(name: str, autograd: bool):
    """torch's functional collective ``name`` (``*_single`` since torch 2.13, ``*_tensor``
    before)."""
    from torch.distributed import _functional_collectives as funcol

    suffix = "_autograd" if autograd else ""
    new = getattr(funcol, f"{name}_single{suffix}", None)
    return new or getattr(funcol, f"{name}_tensor{suffix}")


class _GradScale(torch.autograd.Function):
    """Identity forward; scales the gradient. An expert's gradient arrives summed over the
    processes' losses (through the reduce-scatter); the data-parallel objective is their mean."""

    @staticmethod
    def forward(ctx, t, scale):
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def _grad_scale(t: torch.Tensor, scale: float) -> torch.Tensor:
    return _GradScale.apply(t, scale)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        if cfg.n_expert:
            self.moe = MoE(cfg)
        else:
            self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
            self.out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x) if hasattr(self, "moe") else self.out(F.gelu(self.fc(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        # Residual-branch outputs start small so the depth does not inflate the residual stream.
        for blk in self.blocks:
            assert isinstance(blk, Block)
            mlp_out = blk.moe.w_out if cfg.n_expert else blk.out.weight
            nn.init.normal_(blk.attn.proj.weight, std=0.02 / (2 * cfg.n_layer) ** 0.5)
            nn.init.normal_(mlp_out, std=0.02 / (2 * cfg.n_layer) ** 0.5)
            if cfg.n_expert:
                nn.init.normal_(blk.moe.w_in, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, n: int, temperature: float = 0.8,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        for _ in range(n):
            logits = self(idx[:, -self.cfg.seq_len:])[:, -1] / temperature
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
