"""The few-step student sampler as a diffusers scheduler, shipped inside an exported pipeline directory.

This file is copied verbatim to ``<pipeline>/scheduler/vidistill_scheduler.py`` by ``engine.deploy.export_pipeline``
and imports nothing but diffusers, so ``WanPipeline.from_pretrained(<pipeline>, trust_remote_code=True)`` runs the
student without vidistill installed (docs/deploy.md#diffusers-pipeline).

The stepping is diffusers' own ``FlowMatchLCMScheduler``: predict x0 = x - sigma v, then re-noise it to the next
sigma with fresh noise, x = (1 - sigma') x0 + sigma' e (the last step returns x0) -- exactly
``engine.diffusion.samplers.sample_student``. What a built-in scheduler cannot do is take its timesteps from its
config: ``WanPipeline`` calls ``set_timesteps(num_inference_steps)`` only, and FlowMatchLCMScheduler derives the grid
from a shifted linspace. This subclass stores the student's timesteps (``student_timesteps``) in
``scheduler_config.json`` and uses them whenever the caller gives none; ``shift`` stays 1 because the student's sigmas
are its timesteps / num_train_timesteps, unshifted.

The re-noising draws come from ``noise_generator`` when set (``pipe.scheduler.noise_generator = torch.Generator()
.manual_seed(0)``), else from torch's global generator (WanPipeline passes none to ``step``).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchLCMScheduler
from diffusers.configuration_utils import register_to_config


class VidistillStudentScheduler(FlowMatchLCMScheduler):
    """FlowMatchLCMScheduler whose default timesteps are the distilled student's (e.g. [1000, 900, 757, 522])."""

    @register_to_config
    def __init__(
        self, num_train_timesteps: int = 1000, shift: float = 1.0, student_timesteps: list[float] | None = None
    ):
        super().__init__(num_train_timesteps=num_train_timesteps, shift=shift)
        self.noise_generator: torch.Generator | None = None

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None) -> None:
        """With neither ``sigmas`` nor ``timesteps`` given: the student's timesteps (``num_inference_steps``, if
        given, must be their count)."""
        student = self.config.student_timesteps
        if student and sigmas is None and timesteps is None:
            if num_inference_steps not in (None, len(student)):
                raise ValueError(
                    f"scheduler config `student_timesteps`: this student samples in {len(student)} steps at "
                    f"timesteps {list(student)}; got num_inference_steps={num_inference_steps} "
                    f"(pass num_inference_steps={len(student)})"
                )
            num_inference_steps, timesteps = None, [float(t) for t in student]
        super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        return super().step(model_output, timestep, sample, generator or self.noise_generator, return_dict)
