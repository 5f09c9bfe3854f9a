"""The umT5 text encoder as a :class:`~engine.data.interfaces.TextEncoder` (docs/wan.md#umt5).

``encode(prompts)``: clean (ftfy, HTML unescape twice, whitespace collapse), tokenize to ``max_length`` with
truncation and EOS, run transformers' ``UMT5EncoderModel``, then zero every row past the prompt's true length (the
official code trims and zero-pads; zeroing is the same tensor). Returns ``(emb (B, max_length, dim) float32,
lengths (B,) int64)``. Weights and tokenizer come from a local directory only (``local_files_only``): either a
pipeline root with ``text_encoder/`` and ``tokenizer/`` (diffusers layout) or one directory holding both.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import ftfy
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5EncoderModel


def clean_prompt(text: str) -> str:
    """ftfy, HTML unescape (twice: captions scraped from HTML are often double-escaped), collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def _locate(path: Path) -> tuple[Path, Path]:
    """(encoder dir, tokenizer dir) under ``path``."""
    if (path / "text_encoder" / "config.json").is_file():
        return path / "text_encoder", path / "tokenizer" if (path / "tokenizer").is_dir() else path
    if (path / "config.json").is_file():
        return path, path / "tokenizer" if (path / "tokenizer").is_dir() else path
    raise FileNotFoundError(f"{path}: no config.json and no text_encoder/ subdirectory (expected a local umT5)")


class UMT5TextEncoder:
    """Prompts -> ``(emb (B, max_length, dim), lengths (B,))``, rows past each length exactly zero."""

    def __init__(
        self,
        model: UMT5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_length: int = 512,
        negative_prompt: str = "",
    ):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.dim = model.config.d_model
        self.max_length = max_length
        self.negative_prompt = negative_prompt
        self._negative: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> UMT5TextEncoder:
        enc_dir, tok_dir = _locate(Path(path))
        model = UMT5EncoderModel.from_pretrained(str(enc_dir), dtype=dtype, local_files_only=True).to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        return cls(model, tokenizer, **kwargs)

    @classmethod
    def from_config(cls, cfg: Any, device: str | torch.device = "cpu") -> UMT5TextEncoder:
        """From a ``TextEncoderConfig`` (kind ``umt5``); dtype auto = bf16 on CUDA, fp32 elsewhere."""
        if cfg.kind != "umt5" or not cfg.path:
            raise ValueError(f"text_encoder.kind={cfg.kind!r}, path={cfg.path!r}: umT5 needs kind=umt5 and a path")
        cuda = torch.device(device).type == "cuda"
        bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and cuda)
        return cls.from_pretrained(
            cfg.path,
            dtype=torch.bfloat16 if bf16 else torch.float32,
            device=device,
            max_length=cfg.max_length,
            negative_prompt=cfg.negative_prompt,
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompts`` -> (B, max_length, dim) float32 with zero rows past each true length, and lengths (B,)."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a sequence of prompts, not a single string")
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        lengths = mask.sum(dim=1).long()  # (B,)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (B, L, dim)
        keep = torch.arange(self.max_length, device=hidden.device)[None, :] < lengths[:, None]  # (B, L)
        return hidden * keep[..., None], lengths.cpu()

    def negative(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The negative prompt's ``(emb (1, max_length, dim), lengths (1,))``, computed once."""
        if self._negative is None:
            self._negative = self.encode([self.negative_prompt])
        return self._negative
