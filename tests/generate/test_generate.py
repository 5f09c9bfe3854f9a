"""The generation CLI on the toy world (and once on a tiny Wan world): playable mp4s, sidecars, the three samplers,
batch-independent seeds, agreement with the library samplers, and bad input rejected before any weight is read."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from engine.config import load_config, model_preset
from engine.data.mp4 import probe
from engine.diffusion.flow import FlowSchedule
from engine.diffusion.samplers import SampleNoise, sample_student
from engine.diffusion.vif import sample_vif
from engine.generate import (
    GenerateSettings,
    Generator,
    plan_generation,
)
from engine.models.checkpoint import save_weights
from engine.models.interp_unet import InterpUNet
from engine.models.wan import WanModel
from engine.train.timer import PhaseTimer
from launcher import generate as generate_cli
from tests.generate.conftest import TOY_YAML, save_interp, save_student, toy_config

TIMESTEPS = [1000.0, 900.0, 757.0, 522.0]
TIMING_KEYS = {"text_encode_s", "sampling_s", "interpolation_s", "decode_s", "write_s", "batch_videos"}


def run_cli(out: Path, *args: str, config: Path = TOY_YAML) -> int:
    return generate_cli.main(["--config", str(config), "--out", str(out), "--no-progress", *args])


def frames(path: Path) -> np.ndarray:
    """Decoded RGB frames (T, H, W, 3) uint8."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def sidecar(path: Path) -> dict:
    return json.loads(path.with_suffix(".json").read_text())


# ---------------------------------------------------------------------------------------------------------------------
# What the CLI writes
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_writes_playable_mp4s_and_sidecars(tmp_path, deploy, capsys):
    prompts = ["a red circle moves left", "A blue square, static!"]
    out = tmp_path / "out"
    args = ["--student", str(deploy / "transformer"), "--prompt", prompts[0], "--prompt", prompts[1]]
    assert run_cli(out, *args, "--seeds", "0", "3", "--batch", "3") == 0
    names = sorted(p.name for p in out.glob("*.mp4"))
    assert names == [
        "0_a-red-circle-moves-left_seed0.mp4",
        "0_a-red-circle-moves-left_seed3.mp4",
        "1_a-blue-square-static_seed0.mp4",
        "1_a-blue-square-static_seed3.mp4",
    ]
    printed = capsys.readouterr().out.splitlines()
    assert sorted(Path(line).name for line in printed[:-1]) == names
    for path in out.glob("*.mp4"):
        # 9 frames of 32x32 (data.num_frames, height, width), repeated 4x for viewing, at data.fps = 8
        assert probe(path) == {"codec": "h264", "frames": 9, "width": 128, "height": 128, "fps": 8.0}
        info = sidecar(path)
        assert info["prompt"] == prompts[int(path.name[0])] and info["seed"] == int(path.stem[-1])
        assert (info["sampler"], info["steps"], info["timesteps"]) == ("student", 4, TIMESTEPS)
        assert (info["half_rate_steps"], info["rope_positions"], info["guidance"]) == (0, None, None)
        assert info["models"] == {"dit": str(deploy / "transformer"), "interpolator": None}
        assert info["latent_shape"] == [16, 9, 8, 8] and info["fps"] == 8.0 and info["world"] == "toy"
        assert info["tokens_per_step"] == [9 * 4 * 4] * 4  # 9 x 8 x 8 latent, patch (1, 2, 2)
        assert set(info["timings"]) == TIMING_KEYS and info["timings"]["interpolation_s"] == 0.0
        assert info["timings"]["sampling_s"] > 0 and info["timings"]["batch_videos"] in (3, 1)  # 4 videos: 3 + 1
        assert (info["device"], info["kernels"]) == ("cpu", "reference")  # Triton kernels are for CUDA tensors


def test_student_vif_and_teacher_samplers(tmp_path, deploy, trained):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n  a green triangle moves up \n\n")
    common = ["--prompts", str(prompts), "--seed", "2"]
    assert run_cli(tmp_path / "student", "--student", str(deploy), *common) == 0  # the deployment root works too
    assert run_cli(tmp_path / "vif", "--student", str(deploy / "transformer"), "--sampler", "vif", *common) == 0
    teacher = ["--teacher", str(trained["teacher"]), "--sampler", "teacher", "--steps", "3"]
    assert run_cli(tmp_path / "teacher", *teacher, *common) == 0
    videos = {name: tmp_path / name / "0_a-green-triangle-moves-up_seed2.mp4" for name in ("student", "vif", "teacher")}
    infos = {name: sidecar(path) for name, path in videos.items()}
    assert all(probe(p)["frames"] == 9 for p in videos.values())

    vif = infos["vif"]
    assert vif["models"]["interpolator"] == str(deploy / "interpolator")  # found next to the student
    assert (vif["half_rate_steps"], vif["rope_positions"]) == (2, "contiguous")
    assert vif["tokens_per_step"] == [5 * 16, 5 * 16, 9 * 16, 9 * 16]  # 9 frames -> 5 at half rate
    assert vif["timings"]["interpolation_s"] > 0

    teach = infos["teacher"]
    # toy.yaml: shift 2; Euler grid s = 1, 2/3, 1/3 shifted by s' = 2 s / (1 + s): 1, 0.8, 0.5
    assert teach["timesteps"] == pytest.approx([1000.0, 800.0, 500.0], abs=1e-3) and teach["steps"] == 3
    d = load_config(TOY_YAML).diffusion  # the toy recipe's guidance
    assert teach["guidance"] == {"scale": d.guidance_scale, "form": d.guidance_form} and teach["negative_prompt"] == ""
    assert teach["tokens_per_step"] == [2 * 144] * 3  # CFG: conditional + unconditional pass
    assert teach["models"]["dit"] == str(trained["teacher"])

    decoded = {name: frames(path).astype(np.int16) for name, path in videos.items()}
    for a, b in (("student", "vif"), ("student", "teacher"), ("vif", "teacher")):
        assert np.abs(decoded[a] - decoded[b]).mean() > 1.0, (a, b)  # three different computations


def test_same_prompt_and_seed_give_the_same_video_in_any_batch(tmp_path, deploy):
    args = ["--student", str(deploy), "--sampler", "vif", "--prompt", "a red circle", "--prompt", "a blue square",
            "--prompt", "a green triangle moves down", "--seeds", "0", "1"]  # fmt: skip
    assert run_cli(tmp_path / "one", *args, "--batch", "1") == 0
    assert run_cli(tmp_path / "four", *args, "--batch", "4") == 0  # batches of 4 + 2: other neighbours, other sizes
    names = sorted(p.name for p in (tmp_path / "one").glob("*.mp4"))
    assert len(names) == 6
    for name in names:
        a, b = frames(tmp_path / "one" / name).astype(np.int16), frames(tmp_path / "four" / name).astype(np.int16)
        # Batched matmuls round differently for other batch sizes (~1e-6 in the latents, see the next test), which
        # can move a pixel by one level at most; measured on this machine: byte-identical files.
        assert np.abs(a - b).mean() < 0.01, name
    control = frames(tmp_path / "one" / names[0]).astype(np.int16) - frames(tmp_path / "one" / names[1])
    assert np.abs(control).mean() > 1.0  # another seed is another video


@pytest.mark.parametrize("sampler", ["student", "vif", "teacher"])
def test_latents_do_not_depend_on_the_batch(deploy, trained, sampler):
    prompts = ["a red circle", "a blue square moves up", "a green triangle"]
    steps = 3 if sampler == "teacher" else None
    paths = {"student": str(deploy), "teacher": str(trained["teacher"])}
    settings = GenerateSettings(out_dir="unused", prompts=prompts, sampler=sampler, teacher_steps=steps, **paths)
    gen = Generator(plan_generation(toy_config(), settings), "cpu")
    ctx = gen.world.encode_text(prompts)
    with torch.no_grad():
        batch = gen.latents(ctx, [5, 6, 7], PhaseTimer())
        alone = gen.latents(ctx[1:2], [6], PhaseTimer())
    assert torch.allclose(batch[1], alone[0], atol=1e-5, rtol=0)  # measured: <= 3e-6 (float rounding only)
    assert (batch[0] - batch[1]).abs().mean() > 0.1


def test_per_video_noise_source_equals_a_generator_of_that_seed():
    """SampleNoise (one generator per video) drives the library samplers: with one seed it is exactly a torch.Generator
    of that seed, and a video's result does not depend on its batch mates (up to float rounding)."""
    torch.manual_seed(0)
    model = WanModel(model_preset("tiny", gradient_checkpointing=False)).eval()  # in_dim 4 (1.3B: 16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    interp = InterpUNet(4, (4, 8, 8), residual=False).eval()
    schedule, shape, ctx = FlowSchedule(shift=5.0), (4, 5, 4, 4), torch.randn(3, 6, 16)

    def library_draws(seed):  # the first draw is the initial noise; the sampler continues on the same generator
        g = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=g)[None], g

    def ours(seeds):
        sn = SampleNoise(seeds)
        return sn((len(seeds), *shape), torch.float32, "cpu"), sn

    with torch.no_grad():
        noise, g = library_draws(11)
        ref = sample_student(model, noise, ctx[1:2], schedule, TIMESTEPS, g)
        x, sn = ours([11])
        assert torch.equal(sample_student(model, x, ctx[1:2], schedule, TIMESTEPS, sn), ref)
        x, sn = ours([10, 11, 12])  # the same video as the middle one of a batch of three
        batch = sample_student(model, x, ctx, schedule, TIMESTEPS, sn)
        assert torch.allclose(batch[1], ref[0], atol=1e-5, rtol=0)
        for rope in ("contiguous", "stride2"):
            noise, g = library_draws(11)
            ref = sample_vif(model, interp, noise, ctx[1:2], schedule, TIMESTEPS, g, 2, rope)
            x, sn = ours([11])
            assert torch.equal(sample_vif(model, interp, x, ctx[1:2], schedule, TIMESTEPS, sn, 2, rope), ref), rope


def test_wan_world_vae_and_umt5(tmp_path, capsys):
    """The other world from the same code: tiny AutoencoderKLWan + umT5 (built in code) and a tiny DiT."""
    from tests.data.tiny_models import save_text_encoder, save_vae

    models = save_vae(save_text_encoder(tmp_path / "wan"))
    cfg = model_preset("tiny", in_dim=16, out_dim=16, text_dim=16)  # the tiny VAE's z_dim and umT5's d_model
    save_weights(WanModel(cfg), cfg, tmp_path / "deploy" / "transformer")
    overrides = ["model.preset=tiny", "model.in_dim=16", "model.out_dim=16", "model.text_dim=16",
                 "vae.kind=wan", f"vae.path={models}", "text_encoder.kind=umt5", f"text_encoder.path={models}",
                 "text_encoder.max_length=8", "data.num_frames=9", "data.height=16", "data.width=16",
                 "data.fps=8.0"]  # fmt: skip
    out = tmp_path / "out"
    seeds = ["--seeds", "0", "1", "--"]  # -- ends the --seeds list before the overrides
    args = ["--student", str(tmp_path / "deploy"), "--prompt", "a red ball rolls", *seeds]
    # toy.yaml's strides (1, 4) are not the VAE's (4, 8): caught when the VAE is loaded, before the DiT
    assert run_cli(out, *args, *overrides) == 2 and "the codec has strides (4, 8)" in capsys.readouterr().err
    assert run_cli(out, *args, *overrides, "vae.temporal_stride=4", "vae.spatial_stride=8") == 0
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 2
    for path in videos:
        # 9 frames = 1 + 4 x 2 (3 latent frames, temporal stride 4), 16x16 (2x2 latent, stride 8), no upscaling
        assert probe(path) == {"codec": "h264", "frames": 9, "width": 16, "height": 16, "fps": 8.0}
        assert sidecar(path)["world"] == "wan" and sidecar(path)["latent_shape"] == [16, 3, 2, 2]


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one clear error each, before any weight is read (the weight files below are garbage)
# ---------------------------------------------------------------------------------------------------------------------


def fails(capsys, tmp_path, *args: str) -> str:
    out = tmp_path / "out"
    assert run_cli(out, *args) == 2
    assert not list(out.glob("*.mp4"))
    err = capsys.readouterr().err
    assert err.startswith("generate: error: ") and "Traceback" not in err
    return err


def test_control_corrupt_weights_fail_when_read(tmp_path, corrupt_deploy, capsys):
    """The garbage files of the tests below are caught at load time: so in those tests, an earlier check spoke."""
    err = fails(capsys, tmp_path, "--student", str(corrupt_deploy), "--prompt", "a red circle")
    assert "cannot read weights" in err


def test_empty_prompt_file(tmp_path, corrupt_deploy, capsys):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n   \n")
    err = fails(capsys, tmp_path, "--student", str(corrupt_deploy), "--prompts", str(empty))
    assert f"--prompts: {empty} holds no prompt" in err


def test_prompt_file_that_is_not_utf8(tmp_path, corrupt_deploy, capsys):
    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("a red circle\na blue caf\u00e9 square\n".encode("latin-1"))
    err = fails(capsys, tmp_path, "--student", str(corrupt_deploy), "--prompts", str(latin1))
    assert f"--prompts: {latin1} is not UTF-8 text (byte 0xe9 at line 2)" in err and len(err.splitlines()) == 1


def test_missing_prompt_file(tmp_path, corrupt_deploy, capsys):
    err = fails(capsys, tmp_path, "--student", str(corrupt_deploy), "--prompts", str(tmp_path / "nope.txt"))
    assert f"--prompts: {tmp_path / 'nope.txt'} is not a file" in err


def test_missing_checkpoint(tmp_path, capsys):
    err = fails(capsys, tmp_path, "--student", str(tmp_path / "no_such_run" / "transformer"), "--prompt", "a")
    assert "--student: checkpoint not found" in err


def test_not_a_dit_checkpoint(tmp_path, corrupt_deploy, capsys):
    err = fails(capsys, tmp_path, "--student", str(corrupt_deploy / "interpolator"), "--prompt", "a")
    assert "is not a Wan DiT checkpoint" in err


def test_student_of_another_latent_space(tmp_path, capsys):
    student = save_student(tmp_path / "s8" / "transformer", in_dim=8, out_dim=8)
    for file in student.glob("*.safetensors"):
        file.write_bytes(b"garbage")
    err = fails(capsys, tmp_path, "--student", str(student), "--prompt", "a")
    assert "has in_dim=8, the run config's world needs model.in_dim=16" in err


def test_interpolator_with_other_channels_than_the_student(tmp_path, corrupt_deploy, capsys):
    interp = save_interp(tmp_path / "interp8", in_channels=8)
    (interp / "model.safetensors").write_bytes(b"garbage")
    args = ["--student", str(corrupt_deploy), "--sampler", "vif", "--interpolator", str(interp), "--prompt", "a"]
    err = fails(capsys, tmp_path, *args)
    assert "interpolator has 8 latent channels but the student's model.in_dim is 16" in err


def test_frame_count_that_cannot_be_halved(tmp_path, corrupt_deploy, capsys):
    # the toy world's clips are odd by construction: an even data.num_frames is refused with the config, before weights
    args = ["--student", str(corrupt_deploy), "--sampler", "vif", "--prompt", "a", "data.num_frames=8"]
    err = fails(capsys, tmp_path, *args)
    assert "`data.num_frames`" in err and "toy.num_frames=9" in err
    args = [*args, "toy.num_frames=8"]  # ... and so is a world of even clips
    err = fails(capsys, tmp_path, *args)
    assert "num_frames" in err and "must be odd" in err


def test_unknown_world(tmp_path, corrupt_deploy, capsys):
    err = fails(capsys, tmp_path, "--student", str(corrupt_deploy), "--prompt", "a", "text_encoder.kind=umt5")
    assert "vae.kind=toy with text_encoder.kind=umt5 is not a world" in err


def test_wan_world_without_local_weights(tmp_path, corrupt_deploy, capsys):
    args = ["--student", str(corrupt_deploy), "--prompt", "a", "vae.kind=wan", "text_encoder.kind=umt5"]
    err = fails(capsys, tmp_path, *args)
    assert "config key `vae.path`: None does not exist" in err


def test_interpolator_option_needs_the_vif_sampler(tmp_path, corrupt_deploy, capsys):
    args = ["--student", str(corrupt_deploy), "--interpolator", str(corrupt_deploy / "interpolator"), "--prompt", "a"]
    err = fails(capsys, tmp_path, *args)
    assert "--interpolator is used by --sampler vif only" in err


def test_vif_without_an_interpolator_says_how_to_export_one(tmp_path, trained, capsys):
    err = fails(capsys, tmp_path, "--student", str(trained["student"]), "--sampler", "vif", "--prompt", "a")
    assert "--sampler vif needs an interpolator" in err and "launcher/export.py --interpolator" in err
