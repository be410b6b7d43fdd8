"""Checks that stop a run before it writes something useless.

- `check_precision_device`: fp16 autocast does not exist on the CPU, where a run would crash at the
  first matmul with a dtype mismatch; the precision may come from `accelerate config`, so the
  accelerator, not the flag, is asked.
- `NonFiniteGuard`: a NaN or infinite loss (or gradient norm) stops the run before the optimizer
  step that would apply it, or, with `--skip_nan_steps N`, skips up to N such steps. A skipped step
  still counts as a step (its batches are consumed, the LR schedule advances, `--max_train_steps`
  and `--checkpointing_steps` keep their meaning); only the weight update (and the EMA update) is
  left out. The number skipped so far is stored in the checkpoint, so a resumed run has the same
  budget left as an uninterrupted one.
- `require_finite_weights`: the last line of defence before weights are written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from sdft.errors import CliError, NonFiniteError
from sdft.sharding import local_tensor

logger = logging.getLogger("sdft")

CAUSES = ("Usual causes: a learning rate too high for this model (lower --learning_rate, or add warmup with "
          "--lr_warmup_steps), or --mixed_precision fp16 with a VAE that overflows in fp16 (SDXL's VAE: use "
          "--pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix, or bf16). --skip_nan_steps N skips "
          "up to N such steps instead of stopping.")


def check_precision_device(mixed_precision: str, device: torch.device) -> None:
    if mixed_precision == "fp16" and device.type == "cpu":
        raise CliError("Mixed precision fp16 (from --mixed_precision or the accelerate config) needs a GPU; "
                       "this run is on the CPU. Use --mixed_precision bf16 (or no).")


class NonFiniteGuard:
    """Called once per micro-step, before `optimizer.step()`. Non-finite losses of the micro-steps
    of an accumulation window are remembered on the device and checked on the sync step, where one
    host transfer (and, with several processes, one all-reduce, since the loss is per process) decides
    for every process alike."""

    def __init__(self, accelerator, skip_budget: int, position, last_checkpoint: Callable[[], Path | None],
                 check_grad_norm: bool):
        self.accelerator = accelerator
        self.skip_budget = skip_budget
        self.position = position          # its `skipped_steps` is saved with every checkpoint
        self.last_checkpoint = last_checkpoint   # named in the error, so the user knows where to resume
        # Under fp16 the grad scaler expects (and skips) steps with infinite gradients; only the loss counts then.
        self.check_grad_norm = check_grad_norm
        self.bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)

    def allows_step(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, sync: bool) -> bool:
        """False: skip this optimizer step. Raises NonFiniteError when the skip budget is spent."""
        self.bad |= ~torch.isfinite(loss.detach()).all()
        if not sync:
            return True
        what = "loss"
        if grad_norm is not None and self.check_grad_norm and not self.bad.item():
            self.bad |= ~torch.isfinite(torch.as_tensor(grad_norm, device=self.bad.device))
            what = "loss or gradient norm"
        bad = self.bad.float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        self.bad = torch.zeros_like(self.bad)
        if not bad.item():
            return True
        step = self.position.global_step + 1
        if self.position.skipped_steps < self.skip_budget:
            self.position.skipped_steps += 1
            logger.warning("Step %d: non-finite %s; skipped the update (%d of --skip_nan_steps %d).", step, what,
                           self.position.skipped_steps, self.skip_budget)
            return False
        raise NonFiniteError(f"Step {step}: the {what} is not finite (NaN or inf); stopped before applying it. "
                             f"{last_good_checkpoint(self.last_checkpoint())} {CAUSES}")


def last_good_checkpoint(latest: Path | None) -> str:
    if latest is None:
        return "No checkpoint was written yet."
    return f"The last good checkpoint is {latest} (resume with --resume_from_checkpoint latest)."


def require_finite_weights(modules: dict[str, torch.nn.Module], what: str, accelerator=None) -> None:
    """Raise before writing `what` if any trained weight is NaN or infinite. Each process checks
    the part it holds (a shard under FSDP2); with `accelerator` and several processes, the verdict
    is all-reduced, so every process raises together instead of leaving the others in a collective."""
    bad = None
    for role, module in modules.items():
        for name, param in module.named_parameters():
            if param.requires_grad and not torch.isfinite(local_tensor(param.detach())).all():
                bad = bad or f"{role}.{name}"
    if accelerator is not None and accelerator.num_processes > 1:
        count = accelerator.reduce(torch.tensor([float(bad is not None)], device=accelerator.device), reduction="sum")
        bad = bad or ("a weight on another process" if count.item() else None)
    if bad is not None:
        raise NonFiniteError(f"Not writing {what}: the trained weight {bad} is not finite. {CAUSES}")
