"""The DMD branch's prompts when they are not the regression pairs' captions (``data.dmd_prompts``).

Distillation and fine-tuning in one stage (docs/method.md#prompts-and-pairs): the distribution-matching branch
conditions the generator on a broad prompt set, the regression branch reads (latent, caption) pairs of a target
domain. Each prompt source below gives ``(B, L, D)`` embeddings per step in the data pipeline's sharded order
(``engine.data.sampler.ShardedOrder``) under a seed of its own, and its position is part of the checkpoint beside the
pairs' (``engine.worlds.source.SplitSource``):

- :class:`TensorPrompts`: embeddings held in memory (toy captions, a toy prompt file);
- :class:`EncodedPrompts`: prompt strings encoded per batch by the text encoder (a Wan prompt file, umT5 online);
- :class:`CachedPrompts`: a text cache of a prompt manifest (``launcher/precompute.py --kinds text``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import ConfigError
from engine.worlds.source import Ordered

PROMPT_SEED_OFFSET = 1_000_003
"""The prompt order's seed is ``train.seed`` plus this: a permutation independent of the pairs' one."""
KEY = "data.dmd_prompts"


def prompt_seed(seed: int) -> int:
    return seed + PROMPT_SEED_OFFSET


def read_prompt_file(path: str) -> list[str]:
    """Prompts of a text file (one per line; blank lines and lines starting with # skipped) or of a ``.jsonl`` file
    (one object per line with a string ``caption`` or ``prompt``). Errors name the key, the file and the line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config key `{KEY}.path`: {path} is not a file")
    prompts = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or (line.startswith("#") and file.suffix != ".jsonl"):
            continue
        if file.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config key `{KEY}.path`: {path} line {n}: not JSON ({exc.msg})") from exc
        text = row.get("caption", row.get("prompt")) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"config key `{KEY}.path`: {path} line {n}: needs a non-empty `caption` or `prompt`")
        prompts.append(text.strip())
    if not prompts:
        raise ConfigError(f"config key `{KEY}.path`: {path} holds no prompt")
    return prompts


def check_prompt_count(num: int, batch_size: int, world_size: int, what: str, key: str = f"{KEY}.source") -> None:
    """Each data-parallel rank's share of the prompts must fill a micro-batch (refused naming the key before anything
    heavy; the ranks of a sequence-parallel group share theirs)."""
    if num // world_size < batch_size:
        raise ConfigError(
            f"config key `{key}`: {num} {what} cannot fill a micro-batch of {batch_size} on each of {world_size} "
            "data-parallel ranks (optim.micro_batch_size)"
        )


class TensorPrompts(Ordered):
    """Prompt embeddings ``(N, L, D)`` held in memory."""

    what = "prompts"

    def __init__(self, context: torch.Tensor, batch_size: int, *, rank=0, world_size=1, seed=0, device="cpu"):
        super().__init__(context.shape[0], batch_size, rank=rank, world_size=world_size, seed=seed)
        self.context, self.device = context, device

    def next_prompts(self) -> torch.Tensor:
        return self.context[self.next_indices()].to(self.device)


class EncodedPrompts(Ordered):
    """Prompt strings, ``encode``-d a batch at a time (``World.encode_text``: umT5 loaded on first use)."""

    what = "prompts"

    def __init__(self, prompts: list[str], encode: Callable[[list[str]], torch.Tensor], batch_size: int, *,
                 rank=0, world_size=1, seed=0, device="cpu"):  # fmt: skip
        super().__init__(len(prompts), batch_size, rank=rank, world_size=world_size, seed=seed)
        self.prompts, self.encode, self.device = prompts, encode, device

    def next_prompts(self) -> torch.Tensor:
        chosen = [self.prompts[i] for i in self.next_indices().tolist()]
        with torch.no_grad():
            return self.encode(chosen).to(self.device)


class CachedPrompts:
    """The ``text_emb`` of an endless text-only ``CacheDataset`` stream; its position is the state."""

    def __init__(self, dataset, device="cpu"):
        self.dataset, self.device = dataset, device
        self._it = None

    def next_prompts(self) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self.dataset)
        return next(self._it)["text_emb"].to(self.device)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.dataset.load_state_dict(state)

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None
