"""Ulysses sequence parallelism of the DiT: the padding rules in one process, and SP=2 against SP=1 on 2 gloo ranks
(forward and backward, fp32, even and odd token counts; the worker: tests/models/sp_worker.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.models.attention import attention
from engine.models.rope import rope_tables, shard_tables

WORKER = Path(__file__).with_name("sp_worker.py")


def test_padding_keys_are_ignored_and_padding_queries_give_zeros():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 8, generator=g) for _ in range(3))
    pad = lambda t: torch.cat([t, torch.randn(2, 3, 3, 8, generator=g)], dim=1)  # noqa: E731 (3 junk tokens)
    out = attention(pad(q), pad(k), pad(v), "sdpa", valid=7)
    assert out.shape == (2, 10, 3, 8)
    torch.testing.assert_close(out[:, :7], attention(q, k, v, "sdpa"), rtol=0, atol=1e-6)
    assert torch.equal(out[:, 7:], torch.zeros(2, 3, 3, 8))
    unmasked = attention(pad(q), pad(k), pad(v), "sdpa")[:, :7]  # the control: junk keys do change the result
    assert (unmasked - attention(q, k, v, "sdpa")).abs().max() > 1e-2


def test_shards_keep_their_rope_positions_and_padding_rotates_by_nothing():
    cos, sin = rope_tables((3, 1, 3), 12)  # 9 tokens
    c0, s0 = shard_tables(cos, sin, 0, 5)
    c1, s1 = shard_tables(cos, sin, 5, 10)
    assert torch.equal(c0, cos[:5]) and torch.equal(s0, sin[:5])
    assert torch.equal(c1[:4], cos[5:]) and torch.equal(s1[:4], sin[5:])
    assert torch.equal(c1[4], torch.ones(6)) and torch.equal(s1[4], torch.zeros(6))
    c2, s2 = shard_tables(cos, sin, 10, 12)  # a shard past the end: all padding
    assert torch.equal(c2, torch.ones(2, 6)) and torch.equal(s2, torch.zeros(2, 6))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(WORKER), str(out)]
    root = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


CASES = ["even", "odd", "fewer_than_ranks_per_frame", "checkpointed_odd", "stride2_positions"]


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_sp2_forward_and_backward_equal_sp1(report, case):
    """The output on both ranks, and the gradients ZeRO steps with (each rank's averaged over the world), equal the
    whole-sequence model's within 1e-5 (absolute, and relative to the largest gradient entry of each tensor)."""
    r = report[case]
    assert report["world"] == 2
    assert r["ranks_agree"]  # every rank of the group holds the whole output
    assert r["out_diff"] <= 1e-5 and r["no_grad_out_diff"] <= 1e-5
    assert r["dx_diff"] <= 1e-5
    assert r["grad_diff"] <= 1e-5 and r["grad_rel"] <= 1e-5
    assert r["own_share_diff"] >= 100 * max(r["grad_diff"], 1e-7)  # one rank's gradient alone is not the answer


@pytest.mark.distributed
def test_the_cases_cover_padding(report):
    assert {report[c]["tokens"] % 2 for c in CASES} == {0, 1}
    assert report["fewer_than_ranks_per_frame"]["tokens"] == 1  # the second rank holds padding only
