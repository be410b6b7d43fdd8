"""Super-resolution with Swin2SR (Conde et al. 2022, arXiv 2209.11345) through transformers'
`Swin2SRForImageSuperResolution`, e.g. caidas/swin2SR-classical-sr-x2-64."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, Swin2SRForImageSuperResolution

from sdft.data.preprocess.models import load_pretrained

# Each pass multiplies the size by the model's factor; a few passes cover any sane photo.
MAX_PASSES = 4


class Upscaler:
    def __init__(self, model: str, device: torch.device, cache_dir: str | None = None):
        self.device = device
        self.processor = load_pretrained(AutoImageProcessor, model, "--upscale_model", cache_dir)
        # float32: the reconstruction is a pixel regression, and these models are small.
        self.model = load_pretrained(Swin2SRForImageSuperResolution, model, "--upscale_model",
                                     cache_dir).to(device).eval()
        self.factor = int(self.model.config.upscale)

    def __call__(self, image: Image.Image, min_side: int) -> Image.Image:
        """Upscale until the shorter side reaches `min_side` (or MAX_PASSES ran). Alpha is dropped."""
        image = image.convert("RGB")
        for _ in range(MAX_PASSES):
            if min(image.size) >= min_side:
                break
            image = self.once(image)
        return image

    @torch.no_grad()
    def once(self, image: Image.Image) -> Image.Image:
        inputs = self.processor(image, return_tensors="pt")
        output = self.model(pixel_values=inputs["pixel_values"].to(self.device)).reconstruction
        # The processor pads to a multiple of the window size; keep the part that is the image.
        output = output[0, :, : image.height * self.factor, : image.width * self.factor]
        array = output.clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()
        return Image.fromarray(np.round(array * 255).astype(np.uint8))
