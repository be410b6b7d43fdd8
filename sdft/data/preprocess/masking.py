"""Subject masks from CLIPSeg (Lüddecke & Ecker 2022, arXiv 2112.10003) through transformers'
`CLIPSegForImageSegmentation`, e.g. CIDAS/clipseg-rd64-refined, prompted with text such as
"a face" (Replicate's mask_target_prompts)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

from sdft.data.preprocess.models import helper_dtype, load_pretrained


class Segmenter:
    def __init__(self, model: str, device: torch.device, cache_dir: str | None = None):
        self.device, self.dtype = device, helper_dtype(device)
        self.processor = load_pretrained(CLIPSegProcessor, model, "--mask_model", cache_dir)
        self.model = load_pretrained(CLIPSegForImageSegmentation, model, "--mask_model", cache_dir,
                                     dtype=self.dtype).to(device).eval()

    @torch.no_grad()
    def __call__(self, image: Image.Image, prompts: list[str]) -> Image.Image:
        """A soft mask ("L", the image's size): per pixel, the highest probability over `prompts`."""
        image = image.convert("RGB")
        inputs = self.processor(text=prompts, images=[image] * len(prompts), padding=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        logits = self.model(**inputs).logits
        # CLIPSeg squeezes the batch dim away for a single prompt.
        probs = logits.reshape(len(prompts), *logits.shape[-2:]).float().sigmoid().amax(dim=0)
        mask = Image.fromarray(np.round(probs.cpu().numpy() * 255).astype(np.uint8), mode="L")
        return mask.resize(image.size, resample=Image.Resampling.BILINEAR)
