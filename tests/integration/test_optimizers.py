"""Optimizers users bring, through the real SD 1.x entry point in-process on the tiny model: every
curated optimizer installed here trains and moves the weights, a resumed run equals an uninterrupted
one, and a schedule-free run validates, checkpoints and exports its evaluation weights."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_text_to_image as t2i
from sdft import output, trainer
from sdft.builders import build, ddpm_objective, text_image_data
from sdft.cli import run
from sdft.families.sd import StableDiffusion
from sdft.optim import CURATED
from sdft.validation_loss import ValidationLoss
from tests.integration.conftest import accelerate_launch, sd_args

pytestmark = pytest.mark.integration
FAST = ["--train_batch_size", "1", "--report_to", "none", "--checkpointing_steps", "100"]
# Learning rates each optimizer is usually run at (Prodigy estimates its own step size from 1.0).
LEARNING_RATES = {"prodigy": "1.0", "prodigyschedulefree": "1.0", "sgdnesterov": "1e-2", "sgdschedulefree": "1e-2"}
# RAdam's rectifier holds the first steps still (silent_sgd_phase); let it take SGD steps there.
EXTRA = {"radamschedulefree": ["--optimizer_args", "silent_sgd_phase=False"]}


@pytest.fixture(autouse=True)
def _reset_accelerate(fresh_accelerate_state):
    yield


def train(argv: list) -> int:
    from accelerate.state import AcceleratorState, GradientState

    try:
        return run(t2i.main, t2i.parse_args([str(a) for a in argv]))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def installed(name: str) -> bool:
    return importlib.util.find_spec(CURATED[name].target.split(".")[0]) is not None


@pytest.mark.parametrize("name", [*(entry.name for entry in CURATED.values()), "torch.optim.RMSprop"])
def test_each_optimizer_trains_four_steps_and_moves_the_weights(tiny_sd, image_folder, tmp_path, name):
    key = name.lower()
    if key in CURATED and not installed(key):
        pytest.skip(f"{CURATED[key].pip} is not installed")
    out = tmp_path / "out"
    lr = LEARNING_RATES.get(key, "1e-3")
    assert train(sd_args(tiny_sd, image_folder, out, *FAST, "--max_train_steps", "4", "--optimizer_type", name,
                         "--learning_rate", lr, *EXTRA.get(key, []))) == 0
    trained, base = unet_weights(out), unet_weights(tiny_sd)
    moved = [k for k in base if not torch.equal(trained[k], base[k])]
    assert len(moved) > len(base) // 2, f"{name} moved only {len(moved)} of {len(base)} tensors"
    assert all(torch.isfinite(t).all() for t in trained.values())


@pytest.mark.parametrize("name, extra", [
    ("Lion", ["--optimizer_args", "weight_decay=0.1", "betas=0.9,0.99"]),
    ("AdamWScheduleFree", ["--optimizer_args", "warmup_steps=2", "--validation_split", "0.25",
                           "--validate_every_n_steps", "2"]),
])
def test_resume_three_plus_three_equals_six_straight(tiny_sd, image_folder, tmp_path, name, extra):
    if not installed(name.lower()):
        pytest.skip(f"{CURATED[name.lower()].pip} is not installed")
    flags = [*FAST, "--max_train_steps", "6", "--checkpointing_steps", "3", "--optimizer_type", name, *extra]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(sd_args(tiny_sd, image_folder, straight, *flags)) == 0
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    assert train(sd_args(tiny_sd, image_folder, resumed, *flags, "--resume_from_checkpoint", "latest")) == 0
    for folder in ("checkpoint-6", "."):
        a, b = unet_weights(straight / folder), unet_weights(resumed / folder)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{folder}: resumed weights differ"
    step3 = unet_weights(straight / "checkpoint-3")
    assert any(not torch.equal(a[k], step3[k]) for k in a), "steps 4-6 moved the weights"
    assert f"- optimizer: {name} {extra[1]}" in (straight / "README.md").read_text()


@pytest.mark.skipif(importlib.util.find_spec("schedulefree") is None, reason="schedulefree is not installed")
def test_schedule_free_validates_and_exports_its_evaluation_weights(tiny_sd, image_folder, tmp_path, monkeypatch):
    """kohya PR #1250's review: validation and saving must use the averaged weights x (eval mode),
    not the training point y."""
    modes = []

    def recording(original):
        def wrapper(*args, **kwargs):
            modes.append(all(not group["train_mode"] for group in optimizer().param_groups))
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(trainer, "generate_shared", recording(trainer.generate_shared))
    monkeypatch.setattr(ValidationLoss, "compute", recording(ValidationLoss.compute))
    out = tmp_path / "out"
    args = t2i.parse_args([str(a) for a in sd_args(
        tiny_sd, image_folder, out, *FAST, "--max_train_steps", "4", "--optimizer_type", "AdamWScheduleFree",
        "--learning_rate", "1e-2", "--validation_split", "0.25", "--validation_prompt", "a red circle",
        "--num_validation_images", "1", "--validation_epochs", "1")])
    with build(args, StableDiffusion(), make_objective=ddpm_objective, make_data=text_image_data,
               tracker_name="test") as built:
        def optimizer():
            return built.optimizer.optimizer
        trainer.train(built)
        unet = built.trained.modules["unet"]
        training = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        with built.eval_weights.swapped_in():
            evaluation = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        output.finish(built)
    assert modes == [True, True], "val_loss and the validation images come from the evaluation weights"
    exported = unet_weights(out)
    gap = max((training[k] - evaluation[k]).abs().max().item() for k in training)
    assert gap > 1e-4, "the training and evaluation weights should differ after 4 steps"
    for key, value in exported.items():
        torch.testing.assert_close(value, evaluation[key], rtol=0, atol=1e-6, msg=key)
    assert (out / "validation" / "final").is_dir()


@pytest.mark.parametrize("name", ["AdamW", "Lion"])
def test_fused_backward_pass_with_accumulation_equals_the_unfused_run(tiny_sd, image_folder, tmp_path, name):
    """The micro-batches' gradients add up in .grad; the last one's backward pass applies them."""
    if name.lower() in CURATED and not installed(name.lower()):
        pytest.skip(f"{CURATED[name.lower()].pip} is not installed")
    common = [*FAST, "--max_train_steps", "3", "--gradient_accumulation_steps", "2", "--mixed_precision", "no",
              "--optimizer_type", name]
    assert train(sd_args(tiny_sd, image_folder, tmp_path / "plain", *common, "--max_grad_norm", "1000")) == 0
    assert train(sd_args(tiny_sd, image_folder, tmp_path / "fused", *common, "--fused_backward_pass")) == 0
    plain, fused, base = unet_weights(tmp_path / "plain"), unet_weights(tmp_path / "fused"), unet_weights(tiny_sd)
    assert any(not torch.equal(plain[k], base[k]) for k in base), "training moved the weights"
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], rtol=0, atol=1e-6, msg=key)


def test_fused_backward_pass_on_two_processes_equals_ddp_and_resumes_exactly(tiny_sd, image_folder, tmp_path):
    """The fused hooks average each bucket of gradients across the processes before stepping it
    (DDP is not used); the replicas agree, equal DDP's run within 1e-6 and resume exactly."""
    flags = sd_args(tiny_sd, image_folder, tmp_path / "unused", *FAST, "--max_train_steps", "6",
                    "--checkpointing_steps", "3", "--gradient_accumulation_steps", "2", "--mixed_precision", "no")
    result = accelerate_launch("tests/integration/fused_two_process.py", [tmp_path, *flags], num_processes=2)
    assert (result.stdout + result.stderr).count("identical on all 2 processes") == 3
    plain, fused, resumed = (unet_weights(tmp_path / name) for name in ("plain", "fused", "resumed"))
    base = unet_weights(tiny_sd)
    assert any(not torch.equal(plain[k], base[k]) for k in base), "training moved the weights"
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], rtol=0, atol=1e-6, msg=key)
        assert torch.equal(resumed[key], fused[key]), f"{key}: the resumed run differs"
