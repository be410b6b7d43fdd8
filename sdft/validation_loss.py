"""The denoising loss on held-out images (`val_loss`; kohya sd-scripts' --validation_split,
--validation_data_dir, --validate_every_n_steps, --validation_seed).

Every evaluation sees the same images with the same noise and timesteps: batch k's VAE sample,
noise and timesteps come from a generator seeded by (--validation_seed, k), and the held-out
dataset's crops, flips and captions from its own seed at epoch 0. Differences between two
evaluations are therefore differences in the weights alone, and two runs with the same seeds log
the same values.

It is computed with the weights being trained, not the EMA: it measures what the optimizer is
doing; the EMA is swapped in only to generate validation images. Every process computes batch k
when k % N is its index (with the unwrapped models and no gradient) and the sums are added across
processes, so no process waits while another works (finetrainers #114) and the value is the one
process's up to the order of a float64 sum. It touches no global RNG and no state of the training
data loader, so a run with it trains exactly like a run without it.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from sdft.data.dataset import loader_order
from sdft.data.latent_cache import sample_latents

logger = logging.getLogger("sdft")

BEST_FILE = "val_loss.json"   # in each checkpoint folder: the best val_loss so far and its step


def batch_generator(seed: int, batch_index: int, device: torch.device) -> torch.Generator:
    # Process index -1 never occurs in training's (seed, micro-step, process) streams; a tuple of
    # ints hashes the same in every process and run (unlike a string, under PYTHONHASHSEED).
    return torch.Generator(device=device).manual_seed(hash((seed, batch_index, -1)) & (2**63 - 1))


@contextmanager
def on_device(models, roles: list[str], device: torch.device) -> Iterator[None]:
    """Bring the frozen modules parked on the CPU (cached latents or captions) over for a while."""
    for role in roles:
        getattr(models, role).to(device)
    try:
        yield
    finally:
        for role in roles:
            getattr(models, role).to("cpu")


class ValidationLoss:
    """`dataset` is the held-out dataset (its own seed and buckets); `every_n_steps` None means at
    the end of every epoch. `best` is (value, step) of the lowest val_loss so far; `register`
    makes checkpoints carry it, so a resumed run still knows the best of the steps before."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, every_n_steps: int | None,
                 family, objective, weight_dtype: torch.dtype, offloaded: list[str],
                 caption_map: Callable[[list[str]], list[str]] | None = None):
        _, order = loader_order(dataset, batch_size, seed)
        # Not prepared by accelerate: a plain, in-process loader that shares no state (RNG,
        # gradient-accumulation bookkeeping) with the training loader. Epoch 0, always. Its own
        # generator, because a DataLoader otherwise draws its workers' base seed from the global RNG.
        self.loader = DataLoader(dataset, collate_fn=dataset.collate, generator=torch.Generator().manual_seed(seed),
                                 **order)
        self.seed = seed
        self.every_n_steps = every_n_steps
        self.family, self.objective = family, objective
        self.weight_dtype = weight_dtype
        self.offloaded = list(offloaded)
        self.caption_map = caption_map   # e.g. new tokens written into the captions (pivotal tuning)
        self.best: tuple[float, int] | None = None
        self.num_images = len(dataset)
        self.is_main_process = True

    def register(self, accelerator) -> None:
        self.is_main_process = accelerator.is_main_process
        accelerator.register_save_state_pre_hook(self.save_best)
        accelerator.register_load_state_pre_hook(self.load_best)

    def save_best(self, models, weights, output_dir: str) -> None:
        """accelerate's save_state pre-hook (called on every process; only the main one knows)."""
        if self.is_main_process and self.best is not None:
            value, step = self.best
            (Path(output_dir) / BEST_FILE).write_text(json.dumps({"val_loss": value, "step": step}))

    def load_best(self, models, input_dir: str) -> None:
        """accelerate's load_state pre-hook; a checkpoint without the file (no val_loss yet) is fine."""
        path = Path(input_dir) / BEST_FILE
        if path.is_file():
            saved = json.loads(path.read_text())
            self.best = (saved["val_loss"], saved["step"])

    def due(self, step: int, end_of_epoch: bool) -> bool:
        if self.every_n_steps is None:
            return end_of_epoch
        return not end_of_epoch and step % self.every_n_steps == 0

    @torch.no_grad()
    def compute(self, models, denoiser: torch.nn.Module, device: torch.device, autocast,
                share: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed per-image denoising loss and the image count of this process's `share`
        (process index, process count) of the held-out batches."""
        rank, processes = share
        was_training = denoiser.training
        denoiser.eval()
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        try:
            with on_device(models, self.offloaded, device):
                for index, batch in enumerate(self.loader):
                    if index % processes != rank:
                        continue
                    if self.caption_map is not None:
                        batch = {**batch, "captions": self.caption_map(batch["captions"])}
                    generator = batch_generator(self.seed, index, device)
                    raw = sample_latents(models.vae, batch["pixel_values"].to(device), generator)
                    latents = self.family.scale_latents(models, raw).to(self.weight_dtype)
                    cond = self.family.condition(models, batch, device)
                    noised = self.objective.noise(latents, generator)
                    with autocast():
                        pred = self.family.predict(denoiser, noised.noisy, noised.timesteps, cond)
                    total += self.objective.loss(pred.float(), noised).double().sum()
                    count += len(batch["captions"])
        finally:
            denoiser.train(was_training)
        return total, count

    def evaluate(self, accelerator, models, denoiser: torch.nn.Module, step: int) -> float:
        """Compute on every process (its share of the batches), log as `val_loss` and print."""
        total, count = self.compute(models, denoiser, accelerator.device, accelerator.autocast,
                                    share=(accelerator.process_index, accelerator.num_processes))
        if accelerator.num_processes > 1:
            total, count = accelerator.reduce(torch.stack([total, count]), reduction="sum")
        value = (total / count).item()
        if self.best is None or value < self.best[0]:
            self.best = (value, step)
        accelerator.log({"val_loss": value}, step=step)
        logger.info("val_loss = %.6f at step %d (%d held-out images)", value, step, self.num_images)
        return value
