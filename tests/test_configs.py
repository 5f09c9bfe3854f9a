"""Each recipe in configs/ loads and validates; the 24-GPU ones hold the paper's values (docs/method.md#hyperparameters)
and their placeholder paths stop a launch with an error naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, deepspeed_config, load_config
from engine.distill.job import check_world_size
from engine.distill.roles import resolve_model_config
from engine.worlds import kind_of, world_latent_shape
from engine.worlds.wan import check_wan_config
from launcher import run as run_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = {"wan2.1-1.3b-24gpu.yaml": (1536, 30), "wan2.1-14b-24gpu.yaml": (5120, 40)}  # (dim, layers)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads_and_validates(path):
    load_config(path)


def test_the_24_gpu_recipes_are_present():
    assert set(RECIPES) <= {p.name for p in CONFIGS.glob("*.yaml")}
    hosts = [ln.split() for ln in (CONFIGS / "hostfile.example").read_text().splitlines() if not ln.startswith("#")]
    assert [slots for _, slots in hosts] == ["slots=8"] * 3


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_24_gpu_recipe_has_the_paper_hyperparameters(name):
    cfg = load_config(CONFIGS / name)
    assert (cfg.model.dim, cfg.model.num_layers) == RECIPES[name]
    o = cfg.optim
    assert (o.lr, o.critic_lr, tuple(o.betas), o.max_grad_norm) == (2e-6, 2e-6, (0.9, 0.999), 10.0)
    d = cfg.diffusion
    assert (d.num_train_timesteps, d.shift, d.guidance_scale, d.guidance_form) == (1000, 5.0, 5.0, "standard")
    assert d.student_timesteps == [1000, 900, 757, 522]
    m = cfg.method
    assert m.critic_per_generator == 5
    r, t = m.regression, m.temporal
    assert (r.enabled, r.adaptive, r.weight, r.k, r.ema_decay) == (True, True, 2.0, 3.0, 0.95)
    assert (t.enabled, t.weight, t.power, t.eps, t.tau) == (True, 0.05, 1.0, 1e-6, 0.6)
    assert (cfg.data.num_frames, cfg.data.fps, cfg.data.width, cfg.data.height) == (81, 16.0, 832, 480)
    assert cfg.data.source == "cache" and cfg.model.gradient_checkpointing
    assert world_latent_shape(cfg) == (16, 21, 60, 104)  # docs/method.md#flow-matching
    ds = deepspeed_config(cfg, 24, cuda=True)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and ds["train_batch_size"] == 24
    assert ds["gradient_clipping"] == 10.0
    check_world_size(cfg, 24)
    with pytest.raises(ConfigError, match="optim.global_batch_size"):
        check_world_size(cfg, 16)
    assert kind_of(cfg) == "wan"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_placeholder_paths_fail_naming_the_key(name):
    cfg = load_config(CONFIGS / name)
    with pytest.raises(ConfigError, match="`model.checkpoint`.*CHANGE_ME"):
        resolve_model_config(cfg)
    with pytest.raises(ConfigError, match="`data.cache_dir`.*CHANGE_ME"):
        check_wan_config(cfg)
    with pytest.raises(ConfigError, match="`data.manifest`.*CHANGE_ME"):
        check_wan_config(load_config(CONFIGS / name, ["data.source=online"]))


def test_the_launcher_stops_on_a_placeholder_with_the_key(capsys):
    assert run_cli.main(["--config", str(CONFIGS / "wan2.1-1.3b-24gpu.yaml")]) == 2
    err = capsys.readouterr().err
    assert "config key `model.checkpoint`" in err and "/CHANGE_ME/Wan2.1-T2V-1.3B" in err
