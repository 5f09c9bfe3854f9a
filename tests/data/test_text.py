"""umT5 text-encoder wrapper: parity with transformers and with diffusers' Wan prompt path, zero padding, cleaning."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from transformers import AutoTokenizer, UMT5EncoderModel

from engine.config import TextEncoderConfig
from engine.data.interfaces import TextEncoder
from engine.data.text import UMT5TextEncoder, clean_prompt
from tests.data.tiny_models import save_text_encoder

PROMPTS = [
    "a red ball rolls to the left",
    "  dance   monkey &amp;amp; the cat\n",
    "two dogs run on the beach at sunset",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_text_encoder(tmp_path_factory.mktemp("umt5"))


@pytest.fixture(scope="module")
def encoder(model_dir):
    return UMT5TextEncoder.from_pretrained(model_dir, max_length=16)


def test_satisfies_the_text_encoder_protocol(encoder):
    assert isinstance(encoder, TextEncoder)
    assert (encoder.dim, encoder.max_length) == (16, 16)


def test_clean_prompt():
    assert clean_prompt("  a  cat\t\n on &amp;amp; mat ") == "a cat on & mat"
    assert clean_prompt("cafÃ© mocha") == "café mocha"  # ftfy repairs mojibake


def test_matches_transformers_called_directly(model_dir, encoder):
    tok = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
    model = UMT5EncoderModel.from_pretrained(model_dir / "text_encoder").eval()
    cleaned = [" ".join(p.replace("&amp;amp;", "&").split()) for p in PROMPTS]  # what cleaning must give
    t = tok(cleaned, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=t.input_ids, attention_mask=t.attention_mask).last_hidden_state
    lengths = t.attention_mask.sum(1)
    emb, got_lengths = encoder.encode(PROMPTS)
    assert emb.shape == (3, 16, 16) and got_lengths.tolist() == lengths.tolist()
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(emb[i, :n], hidden[i, :n], rtol=1e-6, atol=1e-6)
        assert torch.count_nonzero(emb[i, n:]) == 0  # rows past the true length are exactly zero
    assert lengths.max() == 16 and lengths.min() < 16  # the long prompt was truncated, the short ones padded


def test_matches_diffusers_wan_prompt_embeddings(model_dir, encoder):
    tok = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
    model = UMT5EncoderModel.from_pretrained(model_dir / "text_encoder").eval()
    pipe = SimpleNamespace(tokenizer=tok, text_encoder=model, _execution_device=torch.device("cpu"))
    with torch.no_grad():
        ref = WanPipeline._get_t5_prompt_embeds(pipe, PROMPTS, max_sequence_length=16, device=torch.device("cpu"))
    emb, _ = encoder.encode(PROMPTS)
    torch.testing.assert_close(emb, ref, rtol=1e-6, atol=1e-6)


def test_negative_prompt_is_encoded_once(model_dir):
    enc = UMT5TextEncoder.from_pretrained(model_dir, max_length=8, negative_prompt="blurry, static")
    neg, length = enc.negative()
    ref, ref_len = enc.encode(["blurry, static"])
    torch.testing.assert_close(neg, ref)
    assert length.tolist() == ref_len.tolist() and enc.negative()[0] is neg


def test_from_config_and_single_string_is_refused(model_dir):
    enc = UMT5TextEncoder.from_config(TextEncoderConfig(kind="umt5", path=str(model_dir), max_length=12))
    assert enc.max_length == 12 and enc.model.dtype == torch.float32  # auto -> fp32 on CPU
    with pytest.raises(TypeError):
        enc.encode("a single string")
    with pytest.raises(FileNotFoundError):
        UMT5TextEncoder.from_pretrained(model_dir / "missing")
