"""Captions from a BLIP captioning model (Li et al. 2022, arXiv 2201.12086) through transformers'
`BlipForConditionalGeneration`, e.g. Salesforce/blip-image-captioning-large."""

from __future__ import annotations

import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor

from sdft.data.preprocess.models import helper_dtype, load_pretrained


class Captioner:
    def __init__(self, model: str, device: torch.device, cache_dir: str | None = None, max_new_tokens: int = 30):
        self.device, self.dtype = device, helper_dtype(device)
        self.processor = load_pretrained(BlipProcessor, model, "--caption_model", cache_dir)
        self.model = load_pretrained(BlipForConditionalGeneration, model, "--caption_model", cache_dir,
                                     dtype=self.dtype).to(device).eval()
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prefix: str = "") -> list[str]:
        """One caption per image, `prefix` put in front (e.g. "a photo of TOK, ")."""
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        ids = self.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [prefix + text.strip() for text in texts]
