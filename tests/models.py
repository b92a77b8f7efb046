"""Tiny models and data shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyLM(nn.Module):
    """Embedding, two hidden matrices (one wide, one tall), a norm and an untied head."""

    def __init__(self, vocab: int = 20, dim: int = 12, hidden: int = 28, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(self.norm(h))


def batches(n: int, vocab: int = 20, size: int = 64, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (size,), generator=gen) for _ in range(n)]


def lm_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    loss = nn.functional.cross_entropy(model(x), (x + 1) % model.head.out_features)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()
