"""A toy text encoder with umT5's interface: prompts -> ``(B, max_length, dim)`` embeddings plus lengths.

No weights and no download: a token's vector is derived from a SHA-3 hash of the word, so it is the same on every
machine and every library version (the toy teacher's shipped weights depend on it). Each row is
``word_vector(word) + POSITION_SCALE * position_vector(i)``: Wan's cross-attention has no position encoding of its
own, and the toy grammar tells the object's colour from the background's only by word position
("a red circle ... over a gray gradient"). As in umT5, an end-of-sequence token closes every prompt (an empty prompt
has length 1), and rows past a prompt's length are exactly zero (docs/wan.md#umt5).
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Sequence

import numpy as np
import torch

EOS = "</s>"
POSITION_SCALE = 0.5  # position adds 0.25 of the word's variance: words stay the dominant signal


def tokenize(text: str) -> list[str]:
    """Lower-case words (letters and digits); punctuation is dropped; EOS appended."""
    return re.findall(r"[a-z0-9]+", text.lower()) + [EOS]


@functools.lru_cache(maxsize=4096)
def word_vector(word: str, dim: int) -> torch.Tensor:
    """A unit-variance Gaussian vector ``(dim,)`` determined by the word (Box-Muller on SHAKE-256 output)."""
    raw = hashlib.shake_256(f"toy-text/{word}".encode()).digest(8 * dim)  # 2 x 32-bit uniforms per entry
    u = torch.from_numpy(np.frombuffer(raw, dtype="<u4").astype(np.float64))  # (2 * dim,), little-endian everywhere
    u = (u + 0.5) / 2**32  # uniform in (0, 1), never 0
    u1, u2 = u[:dim], u[dim:]
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).float()


@functools.lru_cache(maxsize=16)
def position_vectors(length: int, dim: int) -> torch.Tensor:
    """Sinusoidal positions ``(length, dim)`` (Transformer form), scaled to unit variance per entry."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return (table * math.sqrt(2.0)).float()


class ToyTextEncoder:
    """Deterministic bag-of-positioned-words encoder (satisfies ``engine.data.interfaces.TextEncoder``)."""

    def __init__(self, dim: int = 32, max_length: int = 32):
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be even and >= 2, got {dim}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.dim = dim
        self.max_length = max_length

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(emb, lengths)``: emb ``(B, max_length, dim)`` float32 with zero rows past each length, lengths ``(B,)``
        int64. Prompts longer than ``max_length`` tokens are truncated, keeping EOS last (as umT5's tokenizer)."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a sequence of prompts, not one string")
        emb = torch.zeros(len(prompts), self.max_length, self.dim)
        lengths = torch.zeros(len(prompts), dtype=torch.int64)
        pos = position_vectors(self.max_length, self.dim)  # (L, D)
        for b, prompt in enumerate(prompts):
            tokens = tokenize(prompt)
            if len(tokens) > self.max_length:
                tokens = tokens[: self.max_length - 1] + [EOS]
            n = len(tokens)
            words = torch.stack([word_vector(t, self.dim) for t in tokens])  # (n, D)
            emb[b, :n] = words + POSITION_SCALE * pos[:n]
            lengths[b] = n
        return emb, lengths
