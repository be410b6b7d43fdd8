"""Optimizers users bring, through the real entry points in-process on the tiny models: every
curated optimizer installed here trains each family (SD, SDXL, SD3) and moves the weights, a resumed
run equals an uninterrupted one, a schedule-free run validates, checkpoints and exports its
evaluation weights, and the fused backward pass equals the unfused run (one process with
accumulation; two processes, against DDP)."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_text_to_image as t2i
from sdft import output, trainer
from sdft.builders import build, build_optimizer, ddpm_objective, text_image_data
from sdft.cli import run
from sdft.families.sd import StableDiffusion
from sdft.optim import CURATED, EvalWeights, build_lr_scheduler
from sdft.stepping import OptimizerStepper
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


# Every curated optimizer whose package is installed here, and a class named by module.Class.
OPTIMIZERS_HERE = [*(e.name for e in CURATED.values() if installed(e.name.lower())), "torch.optim.RMSprop"]


def sd3_args(model: Path, data: Path, output: Path, *extra) -> list:
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--output_dir", output,
            "--instance_prompt", "a photo of sks dog", "--resolution", "32", "--max_sequence_length", "16",
            "--lr_warmup_steps", "0", "--seed", "0", *extra]


class EveryOptimizer:
    """Stands in for trainer.train: the script builds its run (family, data, objective) as usual;
    then every curated optimizer installed here, built from the same flags through
    builders.build_optimizer, takes 4 real training steps on the run's trained weights from the
    same start."""

    def __init__(self, script, argv: list[str]):
        self.script, self.argv, self.moved = script, argv, {}

    def __call__(self, run) -> None:
        run.sampler.use_epoch(0)
        run.dataset.use_epoch(0)
        batches = list(run.dataloader)
        params = [p for group in run.optimizer.param_groups for p in group["params"]]
        start = [p.detach().clone() for p in params]
        for name in OPTIMIZERS_HERE:
            with torch.no_grad():
                for param, value in zip(params, start):
                    param.copy_(value)
            key = name.lower()
            args = self.script.parse_args([*self.argv, "--optimizer_type", name, "--learning_rate",
                                           LEARNING_RATES.get(key, "1e-3"), *EXTRA.get(key, [])])
            optimizer = build_optimizer(args, [{"params": params}], 1)
            stepped = dataclasses.replace(
                run, optimizer=optimizer, stepper=OptimizerStepper(optimizer), eval_weights=EvalWeights(optimizer),
                lr_scheduler=build_lr_scheduler("constant", optimizer, warmup_steps=0, total_steps=4, num_processes=1))
            for step in range(4):
                trainer.training_step(stepped, batches[step % len(batches)], step)
            self.moved[name] = [bool(torch.isfinite(p).all()) and not torch.equal(p, s) for p, s in zip(params, start)]


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_every_optimizer_trains_four_steps_of_each_family(family, tiny_sd, tiny_sdxl, tiny_sd3, image_folder,
                                                          tmp_path, monkeypatch, one_thread):
    import train_dreambooth_sd3
    import train_text_to_image_sdxl

    script = {"sd": t2i, "sdxl": train_text_to_image_sdxl, "sd3": train_dreambooth_sd3}[family]
    args = {"sd": partial(sd_args, tiny_sd), "sdxl": partial(sd_args, tiny_sdxl), "sd3": partial(sd3_args, tiny_sd3)}
    argv = [str(a) for a in args[family](image_folder, tmp_path / "out", *FAST, "--max_train_steps", "4",
                                         "--mixed_precision", "no")]
    every = EveryOptimizer(script, argv)
    monkeypatch.setattr(trainer, "train", every)
    monkeypatch.setattr(output, "finish", lambda run: None)
    assert run(script.main, script.parse_args(argv)) == 0
    assert list(every.moved) == OPTIMIZERS_HERE
    for name, moved in every.moved.items():
        assert sum(moved) > len(moved) // 2, f"{family}: {name} moved only {sum(moved)} of {len(moved)} tensors"


@pytest.mark.parametrize("name, extra", [
    ("Lion", ["--optimizer_args", "weight_decay=0.1", "betas=0.9,0.99"]),
    ("AdamW8bit", ["--optimizer_args", "weight_decay=0.1", "betas=0.9,0.99"]),
    ("CAME", ["--optimizer_args", "weight_decay=0.01", "betas=0.9,0.999,0.9999"]),
    ("Prodigy", ["--learning_rate", "1.0", "--optimizer_args", "d_coef=0.5"]),
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
    card_args = extra[extra.index("--optimizer_args") + 1]
    assert f"- optimizer: {name} {card_args}" in (straight / "README.md").read_text()


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
