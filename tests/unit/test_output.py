"""The exported full pipeline: trained modules written, frozen ones copied byte for byte."""

from __future__ import annotations

import filecmp
import json

import torch

from sdft.families.sd import StableDiffusion
from sdft.families.source import ModelSource
from sdft.output import export_pipeline
from sdft.tiny import build_sd


def test_export_copies_frozen_components_and_only_the_listed_ones(tmp_path):
    base = build_sd(tmp_path / "base")
    (base / "checkpoint-3").mkdir()          # the base may be an earlier run's output folder
    (base / "checkpoint-3" / "optimizer.bin").write_bytes(b"x")
    family = StableDiffusion()
    models = family.load(ModelSource(str(base)))
    with torch.no_grad():
        for param in models.unet.parameters():
            param.add_(0.5)

    out = tmp_path / "out"
    pipeline = export_pipeline(family, ModelSource(str(base)), {"unet": models.unet}, out, "v_prediction")

    assert not (out / "checkpoint-3").exists()
    for name in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "tokenizer/tokenizer.json"):
        assert filecmp.cmp(base / name, out / name, shallow=False), f"{name} was not copied as is"
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    saved = pipeline.unet.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in models.unet.state_dict().items())
