"""Small pieces of the trainer that decide reproducibility: seeds and per-step generators."""

from __future__ import annotations

import torch

from sdft.builders import resolve_seed, weight_dtype_of
from sdft.checkpointing import Position
from sdft.trainer import step_generator


def test_a_random_seed_is_chosen_when_none_is_given(accelerator):
    seeds = {resolve_seed(None, None) for _ in range(3)}
    assert all(isinstance(s, int) and 0 <= s < 2**31 for s in seeds) and len(seeds) > 1


def test_a_resumed_run_keeps_the_checkpoint_seed(accelerator, caplog):
    assert resolve_seed(None, Position(global_step=4, seed=7)) == 7
    assert resolve_seed(5, Position(global_step=4, seed=7)) == 7
    assert "seed 7" in caplog.text
    assert resolve_seed(5, Position(global_step=4)) == 5   # a diffusers checkpoint records no seed


def test_step_generators_depend_on_seed_step_and_process_only():
    def draw(seed, step, rank):
        return torch.randn(4, generator=step_generator(seed, step, rank, torch.device("cpu")))

    assert torch.equal(draw(0, 3, 0), draw(0, 3, 0))
    assert not torch.equal(draw(0, 3, 0), draw(0, 4, 0))
    assert not torch.equal(draw(0, 3, 0), draw(0, 3, 1))
    assert not torch.equal(draw(0, 3, 0), draw(1, 3, 0))


def test_weight_dtype_follows_the_accelerator(accelerator):
    assert weight_dtype_of(accelerator) == torch.float32


def test_validation_samples_with_the_trained_prediction_type(accelerator, tmp_path):
    """--prediction_type v_prediction on an epsilon model: validation images must be sampled as v too."""
    from types import SimpleNamespace

    from sdft.families.sd import StableDiffusion
    from sdft.families.source import ModelSource
    from sdft.tiny import build_sd
    from sdft.trainer import validation_pipeline

    family, source = StableDiffusion(), ModelSource(str(build_sd(tmp_path / "sd")), None, None, None)
    models = family.load(source)
    run_state = SimpleNamespace(family=family, source=source, models=models, weight_dtype=torch.float32,
                                trained=SimpleNamespace(modules={"unet": models.unet}), accelerator=accelerator,
                                scheduler_settings={"prediction_type": "v_prediction"})
    assert models.noise_scheduler.config.prediction_type == "epsilon"
    assert validation_pipeline(run_state).scheduler.config.prediction_type == "v_prediction"
