"""The run config: YAML + dotted overrides, errors that name the key, YAML dump round trip, DeepSpeed dict."""

from pathlib import Path

import pytest

from engine.config import ConfigError, deepspeed_config, load_config, to_yaml

TOY = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"


def _write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_yaml_then_overrides_then_preset(tmp_path):
    path = _write(tmp_path, "model:\n  preset: tiny\n  num_layers: 3\noptim:\n  lr: 1.0e-5\n")
    cfg = load_config(path, ["optim.lr=1e-6", "diffusion.student_timesteps=[1000,750,500,250]"])
    assert cfg.model.dim == 24 and cfg.model.num_layers == 3  # preset, then YAML on top
    assert cfg.optim.lr == 1e-6  # CLI last
    assert cfg.diffusion.student_timesteps == [1000, 750, 500, 250]


def test_defaults_follow_the_paper():
    cfg = load_config()
    assert cfg.method.critic_per_generator == 5
    assert (cfg.method.regression.weight, cfg.method.regression.k, cfg.method.regression.ema_decay) == (2.0, 3.0, 0.95)
    assert (cfg.method.temporal.weight, cfg.method.temporal.tau, cfg.method.temporal.power) == (0.05, 0.6, 1.0)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.max_grad_norm) == (2e-6, (0.9, 0.999), 10.0)
    assert (cfg.diffusion.shift, cfg.diffusion.guidance_scale) == (5.0, 5.0)
    assert cfg.diffusion.student_timesteps == [1000, 900, 757, 522]


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.dimm=3", "model.dimm"),
        ("nope.x=1", "nope"),
        ("optim.lr=fast", "optim.lr"),
        ("data.num_frames=80", "data.num_frames"),
        ("diffusion.student_timesteps=[1000,757,900]", "diffusion.student_timesteps"),
        ("model.num_heads=7", "model.num_heads"),
        ("model.attention_backend=cuda", "model.attention_backend"),
        ("method.regression.ema_decay=1.5", "method.regression.ema_decay"),
        ("data.height=470", "data.height"),
        ("model.preset=wan3", "model.preset"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"`{key}`" in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [("data.num_frames=13", "data.num_frames"), ("data.width=64", "data.width")],
)
def test_toy_world_data_must_match_its_clips(override, key):
    """The toy world renders clips from `toy.*`; a `data.*` that describes other clips is an error, not ignored."""
    load_config(TOY)  # consistent as shipped
    with pytest.raises(ConfigError) as err:
        load_config(TOY, [override])
    assert f"`{key}`" in str(err.value) and "toy." in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["optim.lr"])


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["model.preset=toy", "optim.lr=3e-4", "data.num_frames=9", "data.height=32"])
    again = load_config(_write(tmp_path, to_yaml(cfg)))
    assert again == cfg


def test_deepspeed_dict_has_one_source():
    cfg = load_config(None, ["optim.micro_batch_size=2", "optim.grad_accum_steps=3", "deepspeed.dtype=bf16"])
    ds = deepspeed_config(cfg, world_size=24)
    assert ds["train_batch_size"] == 2 * 3 * 24
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 10.0
    cpu = deepspeed_config(load_config(), world_size=2, cuda=False)
    assert not cpu["bf16"]["enabled"]  # auto = fp32 on CPU
    with pytest.raises(ConfigError, match="offload_param"):
        deepspeed_config(load_config(None, ["deepspeed.zero_stage=2", "deepspeed.offload_param=true"]), 1)


def test_toy_world_derives_the_clip_shape_from_toy():
    cfg = load_config(TOY, ["toy.height=48", "toy.width=48"])
    assert (cfg.data.num_frames, cfg.data.height, cfg.data.width, cfg.data.fps) == (9, 48, 48, 8.0)
    same = load_config(TOY, ["data.height=32"])  # agreeing with toy.* is allowed
    assert same.data.height == 32


def test_toy_world_refuses_a_clip_shape_of_its_own():
    with pytest.raises(
        ConfigError, match=r"config key `data.height`: 48, but in the toy world it follows toy.height=32"
    ):
        load_config(TOY, ["data.height=48"])


def test_architecture_comes_from_the_checkpoint_when_the_config_does_not_set_it(tmp_path):
    from engine.config import ARCH_FIELDS, model_preset
    from engine.models.checkpoint import save_weights
    from engine.models.wan import WanModel

    tiny = model_preset("tiny")
    save_weights(WanModel(tiny), tiny, tmp_path / "teacher")
    cfg = load_config(overrides=[f"model.checkpoint={tmp_path / 'teacher'}"])
    assert {f: getattr(cfg.model, f) for f in ARCH_FIELDS if f != "patch_size"} == {
        f: getattr(tiny, f) for f in ARCH_FIELDS if f != "patch_size"
    }
    assert tuple(cfg.model.patch_size) == tuple(tiny.patch_size)
    kept = load_config(overrides=[f"model.checkpoint={tmp_path / 'teacher'}", "model.num_layers=5"])
    assert kept.model.num_layers == 5 and kept.model.dim == tiny.dim  # a set field stays (the job checks it)
    missing = load_config(overrides=[f"model.checkpoint={tmp_path / 'nowhere'}"])
    assert missing.model.dim == 1536  # unreadable: left to the job, whose error names model.checkpoint


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=inf", "optim.lr"),
        ("diffusion.guidance_scale=inf", "diffusion.guidance_scale"),
        ("diffusion.guidance_scale=nan", "diffusion.guidance_scale"),
        ("method.temporal.tau=nan", "method.temporal.tau"),  # no range check of its own: the walk catches it
        ("logging.peak_tflops=inf", "logging.peak_tflops"),  # Optional[float]
        ("diffusion.student_timesteps=[1000,nan]", "diffusion.student_timesteps"),  # inside a list
        ("toy.speeds=[1.0,-inf]", "toy.speeds"),  # inside a tuple
    ],
)
def test_non_finite_numbers_are_refused_anywhere(override, key):
    with pytest.raises(ConfigError, match=rf"config key `{key}`: must be finite"):
        load_config(None, [override])


def test_the_finite_walk_covers_every_float_field():
    """Every float field of the tree, nested sections included, is reached: set each one to nan in turn."""
    import dataclasses
    import math

    from engine.config import RunConfig, validate

    def floats(obj, prefix=""):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                yield from floats(v, f"{prefix}{f.name}.")
            elif isinstance(v, float):
                yield f"{prefix}{f.name}"

    def set_nan(obj, path):
        head, *rest = path
        return dataclasses.replace(obj, **{head: set_nan(getattr(obj, head), rest) if rest else math.nan})

    cfg = RunConfig()
    keys = list(floats(cfg))
    assert "optim.lr" in keys and "method.regression.k" in keys and len(keys) > 20
    for key in keys:
        with pytest.raises(ConfigError, match=rf"`{key}`: must be finite"):
            validate(set_nan(cfg, key.split(".")))


@pytest.mark.parametrize("key", ["logging.run_dir", "toy_teacher.out_dir", "toy_teacher.export_dir"])
def test_empty_output_directories_are_refused(tmp_path, key):
    section, name = key.split(".")
    path = _write(tmp_path, f'{section}:\n  {name}: ""\n')
    with pytest.raises(ConfigError, match=rf"config key `{key}`: must not be empty"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"config key `{key}`: must not be empty"):
        load_config(None, [f"{key}='  '"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.betas=[0.9]", "optim.betas"),
        ("optim.betas=[0.9,0.99,0.999]", "optim.betas"),
        ("optim.betas=[0.9,fast]", "optim.betas"),
        ("model.patch_size=[1,2]", "model.patch_size"),
        ("toy.object_size=[0.3]", "toy.object_size"),
    ],
)
def test_tuple_fields_of_the_wrong_length_or_type_name_their_key(override, key, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"config key `{key}`:" in str(err.value) and "$VALUE" not in str(err.value)
    section, name = override.split("=")[0].split(".")
    yaml = _write(tmp_path, f"{section}:\n  {name}: {override.split('=')[1]}\n")
    with pytest.raises(ConfigError, match=rf"config key `{key}`:"):  # the same from a YAML file
        load_config(yaml)


def test_fp16_without_cuda_names_the_key():
    from engine.config import resolve_dtype

    cfg = load_config(None, ["deepspeed.dtype=fp16"])
    with pytest.raises(ConfigError, match=r"config key `deepspeed.dtype`: fp16 needs CUDA"):
        resolve_dtype(cfg, cuda=False)
    assert str(resolve_dtype(cfg, cuda=True)) == "torch.float16"
    assert deepspeed_config(cfg, 8, cuda=True)["fp16"]["enabled"]


def test_the_toy_micro_batch_must_fit_the_training_clips():
    with pytest.raises(ConfigError, match=r"config key `optim.micro_batch_size`: 1000 is more than .* 922 training"):
        load_config(TOY, ["optim.micro_batch_size=1000"])  # 1024 clips, 102 of them val
    load_config(TOY, ["optim.micro_batch_size=922"])


def test_run_dir_must_be_writable(tmp_path):
    from engine.config import check_run_dir

    (tmp_path / "a_file").write_text("")
    cfg = load_config(None, [f"logging.run_dir={tmp_path / 'a_file' / 'run'}"])
    with pytest.raises(ConfigError, match=r"config key `logging.run_dir`: .* is not a writable directory"):
        check_run_dir(cfg)
    ok = load_config(None, [f"logging.run_dir={tmp_path / 'new' / 'run'}"])
    assert check_run_dir(ok).is_dir() and not list(check_run_dir(ok).iterdir())  # created, probe removed


@pytest.mark.parametrize(
    "overrides",
    [
        [
            "method.dmd.enabled=false",
            "method.critic_per_generator=1",
            "method.regression.enabled=false",
            "method.temporal.enabled=false",
        ],  # fmt: skip
        ["method.dmd.weight=0", "method.regression.weight=0", "method.temporal.enabled=false"],
    ],
)
def test_a_config_with_every_generator_loss_off_is_refused(overrides):
    with pytest.raises(ConfigError, match="config key `method`: every generator loss is off"):
        load_config(None, overrides)
    load_config(None, overrides[:-1])  # the temporal term alone still trains the generator


def test_quality_margins_are_checked():
    with pytest.raises(ConfigError, match="logging.quality.motion_margin"):
        load_config(None, ["logging.quality.motion_margin=1.5"])
    with pytest.raises(ConfigError, match="logging.sample_count"):
        load_config(None, ["logging.sample_count=0"])
