"""A single-process engine with DeepSpeed's engine interface (backward, step, checkpoints), for methods that train one
small model without DeepSpeed (the toy teacher): the loop and its checkpoints treat both the same way.

Checkpoint files hold tensors and plain containers only (safetensors for the weights, a weights-only torch file for
the optimizer state): loading them never runs code from disk.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.fsutil import fix_mode


class TorchEngine:
    """``backward(loss)`` zeroes the gradients (at an update's first micro-batch) and back-propagates; ``step()`` clips
    (``max_grad_norm``) and steps at the accumulation boundary. With ``grad_accum_steps`` k > 1 it accumulates as
    DeepSpeed does: each micro-batch's loss is scaled by 1/k, the optimizer steps at every k-th ``step()``."""

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        max_grad_norm: float | None = None,
        grad_accum_steps: int = 1,
    ):
        self.module, self.optimizer, self.max_grad_norm = module, optimizer, max_grad_norm
        self.grad_norm: float | None = None
        self.accum, self.micro_steps = grad_accum_steps, 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def gradient_accumulation_steps(self) -> int:
        return self.accum

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.accum == 0

    def backward(self, loss: torch.Tensor) -> None:
        if self.micro_steps % self.accum == 0:
            self.optimizer.zero_grad(set_to_none=True)
        (loss / self.accum if self.accum > 1 else loss).backward()

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            if self.max_grad_norm is not None:
                self.grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
            self.optimizer.step()
        self.micro_steps += 1

    def discard(self) -> None:
        """At the boundary, instead of ``step()``: drop the accumulated gradients, apply nothing."""
        self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1

    def get_global_grad_norm(self):
        """The norm before clipping, as a tensor (no host sync); None before the first step or without clipping."""
        return self.grad_norm

    def save_checkpoint(self, root: str, tag: str, save_latest: bool = False) -> None:
        out = Path(root) / tag
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.module.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
        fix_mode(out / "model.safetensors")  # safetensors writes 0600 whatever the umask
        torch.save(self.optimizer.state_dict(), out / "optimizer.pt")

    def checkpoint_files(self, root: str, tag: str) -> list[Path]:
        """The files :meth:`save_checkpoint` writes (the checkpoint manifest hashes them)."""
        return [Path(root) / tag / "model.safetensors", Path(root) / tag / "optimizer.pt"]

    def load_checkpoint(self, root: str, tag: str):
        src = Path(root) / tag
        if not (src / "model.safetensors").is_file():
            return None, None
        self.module.load_state_dict(load_file(str(src / "model.safetensors")))
        self.optimizer.load_state_dict(torch.load(src / "optimizer.pt", weights_only=True))
        return str(src), {}
