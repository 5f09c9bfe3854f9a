"""Tiny umT5, Wan VAE and DiT models built in code (no download), saved in the diffusers pipeline layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

SENTENCES = [
    "a red ball rolls to the left across a wooden table",
    "a blue square moves up in front of a white wall",
    "the green triangle stays still while the camera pans",
    "dance monkey, dance!",
    "a cat sits on a mat & looks at the sea",
    "two dogs run on the beach at sunset",
]
VAE_TINY = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])


def tiny_tokenizer() -> T5Tokenizer:
    """A Unigram (sentencepiece-style) tokenizer trained on a few sentences, wrapped as a T5 tokenizer."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=80, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(SENTENCES * 4, trainer)
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_umt5(vocab_size: int, seed: int = 0) -> UMT5EncoderModel:
    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=vocab_size, d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=2,  # 4096/64/24 real
                     relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")  # fmt: skip
    return UMT5EncoderModel(cfg).eval()


def save_text_encoder(root: Path) -> Path:
    """``root/text_encoder`` and ``root/tokenizer`` (the diffusers pipeline layout)."""
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    tiny_umt5(len(tokenizer)).save_pretrained(root / "text_encoder")
    return root


def save_vae(root: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    AutoencoderKLWan(**VAE_TINY).save_pretrained(root / "vae")
    return root


def random_dit(cfg, seed: int = 0, std: float = 0.2):
    """Our Wan DiT with every parameter drawn from N(0, std) (zero-initialized tensors would hide mapping bugs)."""
    from engine.models.wan import WanModel

    torch.manual_seed(seed)
    model = WanModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def dit_inputs(seed: int = 5, channels: int = 4, text_dim: int = 16):
    """(x (2, C, 3, 4, 4), t (2,), context (2, 6, text_dim)) for a tiny DiT, timesteps 900 and 300."""
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, channels, 3, 4, 4, generator=g), torch.randn(2, 6, text_dim, generator=g)
    return x, torch.tensor([900.0, 300.0]), ctx
