"""Captions longer than CLIP's 77 tokens, encoded in 75-token chunks the way A1111, Forge and
ComfyUI encode prompts at inference (kohya's --max_token_length 150/225 trains with them).

Each chunk is a full CLIP sequence of its own: <BOS>, up to 75 caption tokens, <EOS>, padding; the
chunks are encoded as one batch and their hidden states put one after another on the sequence
axis (3 x 77 = 231 positions for 225 tokens). The UNet's cross-attention takes any sequence
length. The number of chunks is fixed by the flag, so every caption of a batch (and the empty
negative prompt) has the same length; the pooled output (SDXL) is the first chunk's.
"""

from __future__ import annotations

import torch

CHUNK = 75   # caption tokens per chunk: CLIP's 77 less <BOS> and <EOS>


def chunked_ids(tokenizer, captions: list[str], max_token_length: int) -> torch.Tensor:
    """(batch, chunks, 77) token ids; tokens past `max_token_length` are cut."""
    pieces = tokenizer(captions, add_special_tokens=False, truncation=True, max_length=max_token_length).input_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for tokens in pieces:
        for start in range(0, max_token_length, CHUNK):
            piece = tokens[start:start + CHUNK]
            rows.append([tokenizer.bos_token_id, *piece, tokenizer.eos_token_id] + [pad] * (CHUNK - len(piece)))
    return torch.tensor(rows).view(len(captions), max_token_length // CHUNK, CHUNK + 2)


def join_chunks(states: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch * chunks, 77, dim) encoder states -> (batch, chunks * 77, dim)."""
    return states.reshape(batch, -1, states.shape[-1])
