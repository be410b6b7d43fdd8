"""--max_token_length 150/225 (issue 16): captions in 75-token chunks, as A1111/Forge/ComfyUI encode
long prompts; the chunked conditioning equals three 77-token encodes put side by side."""

from __future__ import annotations

import pytest
import torch

from sdft.families.sd import StableDiffusion
from sdft.families.sdxl import StableDiffusionXL
from sdft.families.source import ModelSource
from sdft.tiny import build_sd

WORDS = ["red", "blue", "green", "circle", "square", "on", "a", "background", "small", "large"]


def caption(num_tokens: int, offset: int = 0) -> str:
    return " ".join(WORDS[(i + offset) % len(WORDS)] for i in range(num_tokens))


def by_hand(tokenizer, encoder, text: str, layer: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Three encodes of <BOS> + 75 caption tokens + <EOS> + padding, concatenated on the sequence axis."""
    tokens = tokenizer(text, add_special_tokens=False).input_ids[:225]
    pad = tokenizer.pad_token_id
    states, pooled = [], None
    for start in (0, 75, 150):
        piece = tokens[start:start + 75]
        ids = torch.tensor([[tokenizer.bos_token_id, *piece, tokenizer.eos_token_id] + [pad] * (75 - len(piece))])
        assert ids.shape == (1, 77)
        with torch.no_grad():
            output = encoder(ids, output_hidden_states=True)
        states.append(output.last_hidden_state if layer is None else output.hidden_states[layer])
        if pooled is None and hasattr(output, "text_embeds"):
            pooled = output.text_embeds
    return torch.cat(states, dim=1), pooled


@pytest.fixture(scope="module")
def sd_models(tmp_path_factory):
    return StableDiffusion().load(ModelSource(str(build_sd(tmp_path_factory.mktemp("models") / "sd"))))


def test_sd_tokens_past_77_change_the_conditioning_and_equal_three_encodes(sd_models):
    long_caption = caption(200)
    assert len(sd_models.tokenizer(long_caption).input_ids) > 200
    changed_tail = " ".join(long_caption.split()[:100] + [caption(100, offset=3)])
    family, cpu = StableDiffusion(max_token_length=225), torch.device("cpu")
    with torch.no_grad():
        chunked = family.encode_text(sd_models, [long_caption, changed_tail], cpu)["encoder_hidden_states"]
        cut = StableDiffusion().encode_text(sd_models, [long_caption, changed_tail], cpu)["encoder_hidden_states"]
    assert chunked.shape[1] == 3 * 77 and cut.shape[1] == 77
    assert torch.equal(cut[0], cut[1])                    # at 77 tokens the tail is never read
    assert not torch.allclose(chunked[0], chunked[1])     # with 225 it is
    expected, _ = by_hand(sd_models.tokenizer, sd_models.text_encoder, long_caption, None)
    assert torch.allclose(chunked[:1], expected, atol=1e-6)
    assert family.text_settings() == {"max_token_length": 225}   # keys the text cache


def test_sdxl_chunked_embedding_equals_three_encodes_per_encoder(tiny_sdxl):
    models = StableDiffusionXL().load(ModelSource(str(tiny_sdxl)))
    family, text = StableDiffusionXL(max_token_length=225), caption(200)
    with torch.no_grad():
        out = family.encode_text(models, [text, "a red circle"], torch.device("cpu"))
    first, _ = by_hand(models.tokenizer, models.text_encoder, text, -2)
    second, pooled = by_hand(models.tokenizer_2, models.text_encoder_2, text, -2)
    assert torch.allclose(out["encoder_hidden_states"][:1], torch.cat([first, second], dim=-1), atol=1e-6)
    assert torch.allclose(out["text_embeds"][:1], pooled, atol=1e-6)   # pooled: the first chunk's
    assert out["encoder_hidden_states"].shape[1] == 231 and out["text_embeds"].shape[0] == 2


def test_max_token_length_75_is_the_plain_encoding(sd_models):
    assert StableDiffusion(max_token_length=75).text_settings() == {}
