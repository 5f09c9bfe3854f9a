"""The toy world's evaluation samplers follow the engine's one per-video noise convention: video i of seed s is the
video ``launcher/generate.py`` writes for the same prompt with ``--seeds video_seed(s, i)``, in any chunk."""

import torch

from engine.config import model_preset
from engine.diffusion.flow import FlowSchedule
from engine.diffusion.samplers import SampleNoise, sample_student, video_seed
from engine.models.wan import WanModel
from engine.toy.sampling import student_latents

SHAPE = (4, 3, 4, 4)
TIMESTEPS = [1000.0, 750.0, 500.0, 250.0]


def _model():
    torch.manual_seed(0)
    model = WanModel(model_preset("tiny", gradient_checkpointing=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_student_video_i_is_the_generate_video_of_its_own_seed():
    model, schedule = _model(), FlowSchedule(shift=2.0)
    context = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(1))
    chunked = student_latents(model, context, SHAPE, schedule, TIMESTEPS, seed=5, batch=2)  # chunks of 2 and 1
    for i in range(3):
        noise = SampleNoise([video_seed(5, i)])  # what generate.py does for --seeds video_seed(5, i)
        x = noise((1, *SHAPE), torch.float32, "cpu")
        alone = sample_student(model, x, context[i : i + 1], schedule, TIMESTEPS, noise)
        torch.testing.assert_close(chunked[i : i + 1], alone, rtol=1e-5, atol=1e-6)
    other = student_latents(model, context, SHAPE, schedule, TIMESTEPS, seed=5, batch=3)  # one chunk of 3
    torch.testing.assert_close(other, chunked, rtol=1e-5, atol=1e-6)
