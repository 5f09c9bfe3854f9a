"""Files from disk never run code: engine/safe_load.py against a crafted pickle, DeepSpeed's own classes, paths read
from files."""

import os

import pytest
import torch

from engine import safe_load
from tests.crafted import craft


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    evil = craft(tmp_path / "evil.pt", marker)
    with pytest.raises(safe_load.UnsafeFileError) as err:
        safe_load.load(evil)
    msg = str(err.value)
    assert msg.startswith(f"{evil}: refused to load") and "GLOBAL posix.system" in msg and "\n" not in msg
    with pytest.raises(safe_load.UnsafeFileError), safe_load.deepspeed_loads():
        torch.load(evil, weights_only=False)  # what DeepSpeed's loader calls: made weights-only in the block
    assert not marker.exists()
    # the check is real: the same file run through plain pickle-loading does create the marker
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_deepspeed_states_load_weights_only_and_torch_load_is_restored(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    f = tmp_path / "optim_states.pt"
    torch.save({"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0), "t": torch.arange(3)}, f)
    with pytest.raises(safe_load.UnsafeFileError, match="GLOBAL deepspeed"):
        safe_load.load(f)  # not allowed outside DeepSpeed's loads
    original = torch.load
    with safe_load.deepspeed_loads():
        state = torch.load(f, map_location="cpu", weights_only=False)
    assert torch.load is original
    assert state["zero_stage"] is ZeroStageEnum.weights and state["loss_scaler"].cur_scale == 1.0
    assert torch.equal(state["t"], torch.arange(3))


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../x"])
def test_paths_read_from_files_stay_inside_their_directory(tmp_path, name):
    with pytest.raises(ValueError, match="is not a file inside"):
        safe_load.inside(tmp_path / "dir", name, "index.json")


def test_a_link_out_of_the_directory_is_refused(tmp_path):
    (tmp_path / "dir").mkdir()
    os.symlink(tmp_path / "secret", tmp_path / "dir" / "link")
    with pytest.raises(ValueError):
        safe_load.inside(tmp_path / "dir", "link", "index.json")
    assert (
        safe_load.inside(tmp_path / "dir", "shard-0.safetensors", "index.json")
        == tmp_path / "dir" / "shard-0.safetensors"
    )


def test_a_weight_index_naming_a_file_outside_its_directory_is_refused(tmp_path):
    from engine.models.checkpoint import CheckpointError, weight_files

    index = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index.parent.mkdir()
    index.write_text('{"weight_map": {"blocks.0.w": "../../elsewhere/model.safetensors"}}')
    with pytest.raises(CheckpointError, match=r"'../../elsewhere/model.safetensors' is not a file inside"):
        weight_files(index.parent)


def test_a_cache_index_naming_a_shard_outside_its_directory_is_refused(tmp_path):
    from engine.data.cache import CacheError, verify_shards

    with pytest.raises(CacheError, match=r"latents/index.json: '/tmp/x.safetensors' is not a file inside"):
        verify_shards(tmp_path, "latents", {"shards": [{"file": "/tmp/x.safetensors", "index": [0]}]})
