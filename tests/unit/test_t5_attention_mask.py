"""SD3 --apply_t5_attn_mask (kohya's flag, issue 21): with the mask, T5's padding does not change the
conditioning; without it (the SD3 pipeline's way) it does. The setting keys the text cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdft.families.sd3 import StableDiffusion3, t5_encode
from sdft.families.source import ModelSource
from sdft.tiny import build_sd3

CAPTION = "a photo of sks dog"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = build_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3")
    return StableDiffusion3().load(ModelSource(str(Path(path))))


def t5_part(family: StableDiffusion3, models, captions: list[str]) -> torch.Tensor:
    """The T5 rows of the conditioning: they follow CLIP's 77 on the sequence axis."""
    with torch.no_grad():
        states = family.encode_text(models, captions, torch.device("cpu"))["encoder_hidden_states"]
    return states[:, 77:]


def prompt_length(models) -> int:
    return int(models.tokenizer_3(CAPTION, return_tensors="pt").attention_mask.sum())


@pytest.mark.parametrize("masked", [True, False])
def test_more_padding_changes_the_conditioning_only_without_the_mask(models, masked):
    short = t5_part(StableDiffusion3(max_sequence_length=16, apply_t5_attn_mask=masked), models, [CAPTION])
    long = t5_part(StableDiffusion3(max_sequence_length=40, apply_t5_attn_mask=masked), models, [CAPTION])
    n = prompt_length(models)
    assert n < 16
    same_prompt_rows = torch.equal(short[:, :n], long[:, :n]) if masked else \
        torch.allclose(short[:, :n], long[:, :n], atol=1e-6)
    assert same_prompt_rows == masked
    if masked:
        assert torch.count_nonzero(long[:, n:]) == 0, "padding rows must be zero with the mask"


def test_other_padding_tokens_give_the_same_conditioning_with_the_mask(models):
    tokens = models.tokenizer_3([CAPTION], padding="max_length", max_length=24, return_tensors="pt")
    ids, mask = tokens.input_ids, tokens.attention_mask
    other = ids.clone()
    other[mask == 0] = 5  # any token id where the padding was
    with torch.no_grad():
        a, b = (t5_encode(models.text_encoder_3, x, mask) for x in (ids, other))
        c, d = (t5_encode(models.text_encoder_3, x, None) for x in (ids, other))
    assert torch.equal(a, b)
    assert not torch.allclose(c, d), "the control: unmasked T5 sees the padding"


def test_the_mask_keys_the_text_cache():
    assert StableDiffusion3(apply_t5_attn_mask=True).text_settings() != StableDiffusion3().text_settings()
    # Off, the key is what it was before the flag existed, so existing caches stay valid.
    assert StableDiffusion3().text_settings() == {"max_sequence_length": 77}
