"""Toy text encoder: the TextEncoder contract, determinism against an independent re-derivation, word order."""

import hashlib
import math
import struct

import pytest
import torch

from engine.data.interfaces import TextEncoder
from engine.toy.text import EOS, POSITION_SCALE, ToyTextEncoder, position_vectors, tokenize, word_vector

PROMPTS = [
    "a red circle moves left over a gray gradient",
    "a blue square and a green triangle stay still over a sand texture, camera pans right",
    "",
]


def _word_vector_by_hand(word: str, dim: int) -> list[float]:
    """The documented recipe, written out without torch or numpy: SHAKE-256 -> uint32 LE -> Box-Muller."""
    raw = hashlib.shake_256(f"toy-text/{word}".encode()).digest(8 * dim)
    u = [(x + 0.5) / 2**32 for x in struct.unpack(f"<{2 * dim}I", raw)]
    return [math.sqrt(-2 * math.log(u[i])) * math.cos(2 * math.pi * u[dim + i]) for i in range(dim)]


def test_satisfies_the_interface():
    enc = ToyTextEncoder(dim=32, max_length=32)
    assert isinstance(enc, TextEncoder)
    emb, lengths = enc.encode(PROMPTS)
    assert emb.shape == (3, 32, 32) and emb.dtype == torch.float32
    assert lengths.dtype == torch.int64
    assert lengths.tolist() == [len(tokenize(p)) for p in PROMPTS] == [10, 17, 1]  # words + EOS
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(emb[b, n:] == 0)  # padding rows exactly zero
        assert torch.all(emb[b, :n].abs().sum(-1) > 0)


def test_rows_follow_the_documented_recipe():
    enc = ToyTextEncoder(dim=16, max_length=12)
    emb, _ = enc.encode(["A red, circle!"])
    pos = position_vectors(12, 16)
    for i, word in enumerate(["a", "red", "circle", EOS]):
        expected = torch.tensor(_word_vector_by_hand(word, 16), dtype=torch.float32) + POSITION_SCALE * pos[i]
        torch.testing.assert_close(emb[0, i], expected, rtol=1e-5, atol=1e-5)


def test_position_table_is_the_sinusoid():
    pos = position_vectors(8, 6)
    i, k = 5, 1  # entry 2k is sin(i / 10000^(2k/d)), 2k + 1 is cos, times sqrt(2)
    assert pos[i, 2 * k].item() == pytest.approx(math.sqrt(2) * math.sin(i / 10000 ** (2 * k / 6)), abs=1e-6)
    assert pos[i, 2 * k + 1].item() == pytest.approx(math.sqrt(2) * math.cos(i / 10000 ** (2 * k / 6)), abs=1e-6)


def test_deterministic_and_word_order_matters():
    a, _ = ToyTextEncoder().encode(PROMPTS)
    b, _ = ToyTextEncoder().encode(PROMPTS)
    assert torch.equal(a, b)
    x, _ = ToyTextEncoder().encode(["a red circle moves left over a blue gradient"])
    y, _ = ToyTextEncoder().encode(["a blue circle moves left over a red gradient"])
    assert not torch.allclose(x, y)  # same bag of words, different roles
    assert torch.equal(x[0, 2:6], y[0, 2:6])  # shared words at shared positions are identical


def test_word_vectors_are_unit_gaussian():
    v = torch.stack([word_vector(f"w{i}", 64) for i in range(200)])  # 12,800 draws
    assert abs(v.mean().item()) < 0.05
    assert abs(v.std().item() - 1.0) < 0.05


def test_truncation_keeps_eos_last():
    enc = ToyTextEncoder(dim=8, max_length=4)
    emb, lengths = enc.encode(["one two three four five six"])
    assert lengths.tolist() == [4]
    expected = word_vector(EOS, 8) + POSITION_SCALE * position_vectors(4, 8)[3]
    torch.testing.assert_close(emb[0, 3], expected)


def test_bad_arguments():
    with pytest.raises(TypeError):
        ToyTextEncoder().encode("a single string")
    with pytest.raises(ValueError):
        ToyTextEncoder(dim=7)
    with pytest.raises(ValueError):
        ToyTextEncoder(max_length=0)
