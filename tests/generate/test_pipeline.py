"""The diffusers pipeline export: ``WanPipeline.from_pretrained`` on the exported directory (tiny transformer, tiny
AutoencoderKLWan, tiny umT5, all built in code) runs the 4-step student with our timesteps and matches our own
``sample_student`` (our DiT, our umT5 wrapper, the same noise draws) within fp32 tolerance."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanPipeline

from engine.config import model_preset
from engine.data.text import UMT5TextEncoder
from engine.diffusion.flow import FlowSchedule
from engine.diffusion.samplers import sample_student
from engine.models.checkpoint import save_weights
from launcher import export as export_cli
from tests.data.tiny_models import random_dit, save_text_encoder, save_vae

TIMESTEPS = [1000.0, 900.0, 757.0, 522.0]
PROMPT = "a red ball rolls to the left across a wooden table"
RUN_YAML = """
model: {{preset: tiny, in_dim: 16, out_dim: 16}}
text_encoder: {{kind: umt5, path: {models}, max_length: 16}}
vae: {{kind: wan, path: {models}, tiling: false}}
data: {{num_frames: 9, height: 16, width: 16}}
diffusion: {{student_timesteps: {timesteps}}}
logging: {{run_dir: {run_dir}}}
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    models = save_vae(save_text_encoder(root / "models"))
    cfg = model_preset("tiny", in_dim=16, out_dim=16, gradient_checkpointing=False, fused_kernels=False)
    student = random_dit(cfg, 0)
    save_weights(student, cfg, root / "student")
    yaml = root / "run.yaml"
    yaml.write_text(RUN_YAML.format(models=models, timesteps=TIMESTEPS, run_dir=root / "run"))
    out = root / "deploy"
    args = ["--checkpoint", str(root / "student"), "--config", str(yaml), "--out", str(out), "--pipeline"]
    assert export_cli.main(args) == 0
    return out, student, models


def noise_from_global_rng(shape, dtype, device):
    return torch.randn(shape, dtype=dtype, device=device)  # what the scheduler's randn_tensor does without a generator


def test_pipeline_directory_reproduces_our_sampler(exported):
    out, student, models = exported
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["scheduler"] == [
        "vidistill_scheduler",
        "VidistillStudentScheduler",
    ]
    pipe = WanPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe.scheduler).__name__ == "VidistillStudentScheduler"

    def run(renoise_seed: int) -> torch.Tensor:
        torch.manual_seed(renoise_seed)
        first = torch.Generator().manual_seed(3)  # the initial noise
        result = pipe(PROMPT, num_frames=9, height=16, width=16, num_inference_steps=4, guidance_scale=1.0,
                      generator=first, output_type="latent", max_sequence_length=16)  # fmt: skip
        return result.frames

    got = run(11)
    assert pipe.scheduler.timesteps.tolist() == TIMESTEPS  # our timesteps, from the exported scheduler config

    encoder = UMT5TextEncoder.from_pretrained(models, max_length=16)
    context, _ = encoder.encode([PROMPT])  # (1, 16, 16)
    noise = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(3))  # 9 frames x 16 px -> (3, 2, 2)
    torch.manual_seed(11)
    expected = sample_student(student, noise, context, FlowSchedule(1000, 5.0), TIMESTEPS, noise_from_global_rng)
    assert got.shape == expected.shape == (1, 16, 3, 2, 2)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (run(12) - expected).abs().max() > 1e-2  # the re-noising draws do matter: another seed, another video

    video = pipe(PROMPT, num_frames=9, height=16, width=16, num_inference_steps=4, guidance_scale=1.0,
                 output_type="np", max_sequence_length=16).frames  # fmt: skip
    assert video.shape == (1, 9, 16, 16, 3)  # the VAE decodes it: a complete pipeline


def test_pipeline_refuses_another_step_count(exported):
    out, _, _ = exported
    pipe = WanPipeline.from_pretrained(out, trust_remote_code=True)
    with pytest.raises(
        ValueError, match=r"`student_timesteps`: this student samples in 4 steps.*\(pass num_inference_steps=4\)"
    ):
        pipe(PROMPT, num_frames=9, height=16, width=16, num_inference_steps=3, guidance_scale=1.0,
             output_type="latent", max_sequence_length=16)  # fmt: skip


def test_pipeline_needs_a_wan_run_config(tmp_path, exported, capsys):
    out, _, _ = exported
    toy = tmp_path / "toy.yaml"
    toy.write_text("vae: {kind: toy}\ntext_encoder: {kind: toy}\nmodel: {preset: tiny}\n")
    args = ["--checkpoint", str(out / "transformer"), "--out", str(tmp_path / "d"), "--pipeline"]
    assert export_cli.main(args) == 2
    assert "--pipeline needs the run config (--config)" in capsys.readouterr().err
    assert export_cli.main([*args, "--config", str(toy)]) == 2
    assert "config key `vae.kind` is 'toy'; a diffusers WanPipeline needs wan" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
