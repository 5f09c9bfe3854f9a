"""The per-phase profile (benchmarks/profile_cycle.py) on its small config: ZeRO-3 moves what its accounting says.

One 2-rank run of the real job (three cycles, 320 tokens): in the bytes cycle every backward pass reduce-scatters
each trained parameter exactly once (DeepSpeed's comms logger against the passes counted on the engines), parameters
are never gathered more often than one gather per pass, the passes follow the 5:1 schedule, and the phases add up to
the cycle's wall-clock.
"""

import pytest

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    from benchmarks.profile_cycle import run, summary

    row = run("toy-320", tmp_path_factory.mktemp("profile"), peak_size=256)
    return row, summary(row)


def test_each_backward_reduce_scatters_every_trained_parameter_once(profile):
    row, s = profile
    for rank in row["ranks"]:
        vol = rank["volume"]
        assert vol["measured"]["reduced"] == vol["theory"]["reduced"] > 0
        assert 0 < vol["measured"]["gathered"] <= vol["theory"]["gathered"]


def test_the_passes_follow_the_5_to_1_schedule(profile):
    row, _ = profile
    for rank in row["ranks"]:
        p = rank["passes"]
        assert p["critic"]["backward"] == 5 and p["generator"]["backward"] == 1 and p["teacher"]["backward"] == 0
        assert p["teacher"]["forward"] >= 1 and p["critic"]["forward"] >= 5 and p["generator"]["forward"] >= 5


def test_the_phases_fit_in_the_cycle(profile):
    row, s = profile
    named = sum(s["phases_s"].values())
    assert 0 < named <= s["wall_s"]
    assert 0 < s["outside_compute_share"] < 1 and s["tokens_per_s"] > 0 and 0 < s["mfu"] < 1
