"""SD3.5 Medium's positional-embedding random crop (--pos_emb_random_crop_rate, issue 21) in the SD3
family: the centre window is exactly the pipeline's, other windows change the prediction, and
the rate decides how often a step gets one."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel

from sdft.families.sd3 import SD3Models, StableDiffusion3, pos_embed_window
from sdft.tiny import SD3_VARIANTS


@pytest.fixture(scope="module")
def transformer() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=4, joint_attention_dim=96,
                                 caption_projection_dim=32, pooled_projection_dim=64,
                                 **SD3_VARIANTS["sd35-medium"]).eval()


def inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(batch, 16, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(batch, 5, 96, generator=g),
            "pooled_projections": torch.randn(batch, 64, generator=g)}
    return noisy, torch.full((batch,), 500.0), cond


def test_the_centre_window_is_the_pipelines_and_others_differ(transformer):
    family = StableDiffusion3()
    noisy, timesteps, cond = inputs()
    size = transformer.config.pos_embed_max_size
    centre = ((size - 4) // 2, (size - 4) // 2)  # 8x8 latents, patch 2: a 4x4 grid
    with torch.no_grad():
        plain = family.predict(transformer, noisy, timesteps, cond)
        same = family.predict(transformer, noisy, timesteps, {**cond, "pos_embed_offset": centre})
        corner = family.predict(transformer, noisy, timesteps, {**cond, "pos_embed_offset": (0, 0)})
    assert torch.equal(plain, same)
    assert not torch.allclose(plain, corner)
    # The replacement lasts one forward pass.
    with torch.no_grad():
        assert torch.equal(family.predict(transformer, noisy, timesteps, cond), plain)
    assert "cropped_pos_embed" not in vars(transformer.pos_embed)


def test_pos_embed_window_is_removed_after_an_error(transformer):
    with pytest.raises(RuntimeError):
        with pos_embed_window(transformer, 0, 0):
            raise RuntimeError("forward failed")
    assert "cropped_pos_embed" not in vars(transformer.pos_embed)


def models_with(transformer) -> SD3Models:
    return SD3Models(*([None] * 7), transformer=transformer, noise_scheduler=None)


def test_rate_zero_adds_nothing_and_draws_nothing(transformer):
    noisy, _, cond = inputs()
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert StableDiffusion3().training_condition(models_with(transformer), cond, noisy, generator) is cond
    assert torch.equal(generator.get_state(), state)


def test_rate_one_picks_varied_windows_inside_the_grid(transformer):
    family = StableDiffusion3(pos_emb_random_crop_rate=1.0)
    noisy, _, cond = inputs()
    size = transformer.config.pos_embed_max_size
    offsets = {family.training_condition(models_with(transformer), cond, noisy,
                                         torch.Generator().manual_seed(step))["pos_embed_offset"]
               for step in range(20)}
    assert len(offsets) > 10
    assert all(0 <= top <= size - 4 and 0 <= left <= size - 4 for top, left in offsets)
