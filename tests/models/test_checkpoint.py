"""Checkpoint layouts: the key map is complete, conversions round-trip, bad checkpoints fail naming what is wrong."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from engine.config import model_preset
from engine.models.checkpoint import (
    CheckpointError,
    diffusers_config,
    diffusers_to_official,
    load_weights,
    official_config,
    official_to_diffusers,
    read_model_config,
    save_weights,
    weight_files,
    weights_fingerprint,
)
from engine.models.wan import WanModel, build_model
from tests.data.tiny_models import random_dit

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("preset, count", [("wan2.1-1.3b", 825), ("wan2.1-14b", 1095)])
def test_key_map_is_complete_on_meta(preset, count):
    """Every official key maps to a diffusers key of the same shape, and back (meta device, no weights)."""
    cfg = model_preset(preset)
    ours = build_model(cfg, device="meta").state_dict()
    with torch.device("meta"):
        ref = WanTransformer3DModel(**{k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")})
    theirs = ref.state_dict()
    assert len(ours) == len(theirs) == count
    mapped = {official_to_diffusers(k): v.shape for k, v in ours.items()}
    assert mapped == {k: v.shape for k, v in theirs.items()}
    assert {diffusers_to_official(k) for k in theirs} == set(ours)


def test_unknown_keys_do_not_map():
    assert official_to_diffusers("blocks.0.cross_attn.k_img.weight") is None  # I2V only
    assert diffusers_to_official("blocks.0.attn2.add_k_proj.weight") is None


def _random_model(cfg, seed=0):
    return random_dit(cfg, seed)


def _official_dir(tmp_path, cfg, model, shards=1):
    """An official-layout checkpoint, made from a model by keeping its (official) key names."""
    out = tmp_path / "official"
    limit = 10**12 if shards == 1 else sum(p.numel() * 4 for p in model.parameters()) // shards + 1
    save_weights(model, cfg, out, layout="official", max_shard_bytes=limit)
    return out


def _run_convert(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "launcher" / "convert.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _inputs(cfg):
    g = torch.Generator().manual_seed(5)
    return (
        torch.randn(2, cfg.in_dim, 3, 4, 6, generator=g),
        torch.tensor([900.0, 10.0]),
        torch.randn(2, 4, cfg.text_dim, generator=g),
    )


def test_convert_cli_official_to_diffusers_and_back(tmp_path):
    cfg = model_preset("tiny", gradient_checkpointing=False)
    model = _random_model(cfg)
    src = _official_dir(tmp_path, cfg, model, shards=3)
    assert len(weight_files(src)) > 1 and (src / "diffusion_pytorch_model.safetensors.index.json").is_file()
    res = _run_convert(src, tmp_path / "diffusers")
    assert res.returncode == 0, res.stderr
    assert "official" in res.stdout and "-> diffusers" in res.stdout
    ref = WanTransformer3DModel.from_pretrained(tmp_path / "diffusers").eval()
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        assert (ref(x, t, ctx, return_dict=False)[0] - model(x, t, ctx)).abs().max() <= 1e-5
    res = _run_convert(tmp_path / "diffusers", tmp_path / "back")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "back" / "config.json").read_text())["_class_name"] == "WanModel"
    again = WanModel(read_model_config(tmp_path / "back", gradient_checkpointing=False))
    assert load_weights(again, tmp_path / "back") == "official"
    for (n, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n


def test_loads_comfy_prefix_and_pipeline_root(tmp_path):
    cfg = model_preset("tiny")
    model = _random_model(cfg)
    single = tmp_path / "comfy.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in model.state_dict().items()}, str(single))
    again = WanModel(cfg)
    assert load_weights(again, single) == "official"
    assert torch.equal(again.head.head.weight, model.head.head.weight)
    save_weights(model, cfg, tmp_path / "pipe" / "transformer")
    assert read_model_config(tmp_path / "pipe").dim == cfg.dim
    assert load_weights(WanModel(cfg), tmp_path / "pipe") == "diffusers"


def test_meta_model_is_materialized_by_loading(tmp_path):
    cfg = model_preset("tiny")
    model = _random_model(cfg)
    save_weights(model, cfg, tmp_path / "ckpt")
    meta = build_model(cfg, device="meta")
    load_weights(meta, tmp_path / "ckpt")
    assert not any(p.is_meta for p in meta.parameters())
    assert torch.equal(meta.blocks[1].ffn[2].weight, model.blocks[1].ffn[2].weight)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    cfg = model_preset("tiny")
    state = {k: v.contiguous() for k, v in _random_model(cfg).state_dict().items()}
    state.pop("blocks.1.ffn.0.weight")
    state["blocks.9.self_attn.q.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_weights(WanModel(cfg), tmp_path / "bad.safetensors")
    assert "blocks.1.ffn.0.weight" in str(err.value) and "blocks.9.self_attn.q.weight" in str(err.value)


def test_shape_mismatch_names_the_key(tmp_path):
    big, small = model_preset("tiny", dim=48, num_heads=4), model_preset("tiny")
    save_weights(_random_model(big), big, tmp_path / "big")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.\S+ has shape \(48,\), the model expects \(24,\)"):
        load_weights(WanModel(small), tmp_path / "big")


def test_wrong_layout_and_missing_files(tmp_path):
    save_file({"encoder.conv_in.weight": torch.zeros(2)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="not a Wan2.1 DiT"):
        load_weights(WanModel(model_preset("tiny")), tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        weight_files(tmp_path / "nope")
    res = _run_convert(tmp_path / "vae.safetensors", tmp_path / "out")
    assert res.returncode == 2 and "not a Wan2.1 DiT" in res.stderr


def test_configs_round_trip():
    cfg = model_preset("wan2.1-14b")
    from engine.models.checkpoint import model_config_from_json

    for raw in (diffusers_config(cfg), official_config(cfg)):
        back = model_config_from_json(raw)
        assert (back.dim, back.num_heads, back.ffn_dim, back.num_layers) == (5120, 40, 13824, 40)


def test_weights_fingerprint_follows_the_values_not_the_location(tmp_path):
    cfg = model_preset("tiny")
    model = _random_model(cfg)
    save_weights(model, cfg, tmp_path / "a")
    save_weights(model, cfg, tmp_path / "copy")  # same weights elsewhere: same identity
    assert weights_fingerprint(tmp_path / "a") == weights_fingerprint(tmp_path / "copy")
    with torch.no_grad():
        model.blocks[0].ffn[0].weight[0, 0] += 1.0  # one value retrained
    save_weights(model, cfg, tmp_path / "b")
    assert weights_fingerprint(tmp_path / "b") != weights_fingerprint(tmp_path / "a")
    # large files are sampled at both ends: a change in the tail is seen with a sample smaller than the file
    files = weight_files(tmp_path / "a")
    assert len(files) == 1 and files[0].stat().st_size > 2 * 4096
    last = list(model.state_dict())[-1]
    with torch.no_grad():
        model.state_dict()[last].view(-1)[-1] += 1.0
    save_weights(model, cfg, tmp_path / "c")
    assert weights_fingerprint(tmp_path / "c", sample_bytes=4096) != weights_fingerprint(tmp_path / "b", 4096)
