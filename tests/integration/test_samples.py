"""Sample sets that look like real inference: a prompt file's sizes, seeds, negatives, steps and
samplers; the step cadence and the grid; EMA and raw rows; the same images as diffusers gives."""

from __future__ import annotations

import json
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from PIL import Image

import train_text_to_image as t2i
from sdft.cli import run
from sdft.plots import grid_size_px
from sdft.sample_prompts import SamplePrompt
from sdft.validation import ValidationPlan, generate
from tests.integration.conftest import accelerate_launch, sd_args

pytestmark = pytest.mark.integration

PROMPT_FILE = """# four prompts, each with its own size, seed, negative prompt, steps and sampler
a red circle --w 32 --h 32 --d 1 --n blue --s 1 --ss ddim
a blue square --w 48 --h 32 --d 2 --n red --l 3 --s 2 --ss euler_a
a green line --w 32 --h 64 --d 3 --l 5.5 --s 1 --ss dpm++ 2m karras
a yellow dot --w 64 --h 48 --s 1 --ss heun
"""
SIZES = [(32, 32), (48, 32), (32, 64), (64, 48)]   # (width, height) of the four prompts


@pytest.fixture(autouse=True)
def _one_thread(fresh_accelerate_state, one_thread):
    """Tiny models run fastest on one thread; several oversubscribe the shared cores."""


@pytest.mark.parametrize("family, sampler, scheduler, options, extra", [
    ("sd", "dpm++ 2m karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, {}),
    ("sdxl", "euler_a", "EulerAncestralDiscreteScheduler", {}, {}),
    # SD3 with the T5 length of training and skip-layer guidance (--sample_slg).
    ("sd3", "heun", "FlowMatchHeunDiscreteScheduler", {}, {"max_sequence_length": 77, "skip_guidance_layers": [0]}),
])
def test_a_sample_equals_what_the_diffusers_pipeline_gives(family, sampler, scheduler, options, extra, request):
    """Same scheduler settings, seed, guidance, negative prompt, size and steps: the same image."""
    import diffusers

    path = request.getfixturevalue({"sd": "tiny_sd", "sdxl": "tiny_sdxl", "sd3": "tiny_sd3"}[family])
    pipeline_cls = {"sd": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline,
                    "sd3": diffusers.StableDiffusion3Pipeline}[family]
    # SD3.5's skip-layer guidance acts from 1% to 20% of the steps: step 1 of 6 is the first it changes.
    steps = 6 if "skip_guidance_layers" in extra else 2
    prompt = SamplePrompt("a red circle", negative_prompt="a blue square", width=48, height=32, seed=5,
                          guidance_scale=4.0, steps=steps, sampler=sampler)
    plan = ValidationPlan([prompt], seed=0, pipeline_kwargs=extra)
    ours = generate(pipeline_cls.from_pretrained(path), plan, torch.device("cpu"), nullcontext)[0]

    pipe = pipeline_cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **options)
    theirs = pipe("a red circle", negative_prompt="a blue square", width=48, height=32, guidance_scale=4.0,
                  num_inference_steps=steps, generator=torch.Generator().manual_seed(5), output_type="np",
                  **extra).images[0]
    assert ours.size == (48, 32)
    # Our PNG-ready image is the pipeline's float image, rounded to 8 bits.
    assert np.abs(np.asarray(ours, dtype=np.float64) / 255 - theirs).max() <= 1 / 255 / 2 + 1e-5


def test_prompt_file_cadence_grid_and_ema_rows(tiny_sd, image_folder, tmp_path):
    """4 prompts from a file, --sample_every_n_steps 2 over 6 steps with --sample_at_first: sets at
    steps 0, 2, 4, 6 and the final one, each image at its prompt's size; EMA and raw rows are equal
    at step 0 (the EMA starts as the weights) and differ after training."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT_FILE)
    out = tmp_path / "out"
    assert run(t2i.main, t2i.parse_args([str(a) for a in sd_args(
        tiny_sd, image_folder, out, "--max_train_steps", "6", "--checkpointing_steps", "100", "--report_to", "none",
        "--use_ema", "--learning_rate", "5e-3", "--sample_prompts", prompts, "--sample_every_n_steps", "2",
        "--sample_at_first")])) == 0
    validation = out / "validation"
    rounds = json.loads((validation / "rounds.json").read_text())
    assert rounds == {"step-000000": 0, "step-000002": 2, "step-000004": 4, "step-000006": 6, "final": 6}
    for folder in rounds:
        for index, size in enumerate(SIZES):
            assert Image.open(validation / folder / f"{index:02d}.png").size == size
    rows = [line.split("\t") for line in (validation / "step-000002" / "prompts.txt").read_text().splitlines()]
    assert rows[:2] == [["00.png", "[EMA] a red circle"], ["00-raw.png", "[raw] a red circle"]] and len(rows) == 8

    def pixels(folder, name):
        return np.asarray(Image.open(validation / folder / name), dtype=np.int16)

    for index in range(4):
        assert np.array_equal(pixels("step-000000", f"{index:02d}.png"), pixels("step-000000", f"{index:02d}-raw.png"))
    assert any(not np.array_equal(pixels("step-000006", f"{i:02d}.png"), pixels("step-000006", f"{i:02d}-raw.png"))
               for i in range(4))
    # The final set comes from the saved (EMA) model: it equals the EMA row of the last in-run set.
    assert np.abs(pixels("final", "00.png") - pixels("step-000006", "00.png")).max() <= 1
    # 8 rows (4 prompts x EMA/raw) by 5 columns (steps 0, 2, 4, 6 and final).
    assert Image.open(validation / "grid.png").size == grid_size_px(rows=8, columns=5)
    assert "sample sets: 4, " in (out / "README.md").read_text()   # their time, in the run summary


def test_two_processes_share_sample_sets_and_val_loss(tiny_sd, image_folder, tmp_path):
    """One 2-process launch against one in-process run with the same flags: the same images, each
    process made half of them, the same val_loss (held-out batches split too), --ddp_timeout in the
    process group. A learning rate of 1e-12 leaves the weights as they are (below half an ulp), so
    the two runs sample the same model although their training noise differs by process."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT_FILE)
    flags = ["--max_train_steps", "2", "--train_batch_size", "1", "--learning_rate", "1e-12", "--sample_prompts",
             prompts, "--sample_every_n_steps", "2", "--sample_at_first", "--validation_split", "0.25",
             "--validate_every_n_steps", "2", "--checkpointing_steps", "100", "--report_to", "none"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(t2i.main, t2i.parse_args([str(a) for a in sd_args(tiny_sd, image_folder, one, *flags)])) == 0
    launched = accelerate_launch("train_text_to_image.py", sd_args(tiny_sd, image_folder, two, *flags,
                                                                   "--ddp_timeout", "7"), num_processes=2)
    assert "process-group timeout = 0:07:00" in launched.stdout + launched.stderr

    for folder in ("step-000000", "step-000002"):
        assert json.loads((two / "validation" / folder / "processes.json").read_text()) == [0, 1, 0, 1]
        assert json.loads((one / "validation" / folder / "processes.json").read_text()) == [0, 0, 0, 0]
        for index in range(4):
            a, b = (np.asarray(Image.open(out / "validation" / folder / f"{index:02d}.png"), dtype=np.int16)
                    for out in (one, two))
            assert np.abs(a - b).max() <= (0 if folder == "step-000000" else 1), (folder, index)

    def best_val_loss(out):
        return next(line for line in (out / "README.md").read_text().splitlines() if "validation loss" in line)

    assert "at step 2" in best_val_loss(one) and best_val_loss(one) == best_val_loss(two)
