"""--optimizer_type and --optimizer_args: the value syntax, which flag wins, the parse-time errors
(unknown argument, missing package, contradicting flags, a decaying schedule with a schedule-free
optimizer), the curated optimizers that claim a per-tensor step really having one, and the
schedule-free evaluation weights."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import train_dreambooth_sd3 as sd3
import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl
from sdft import optim
from sdft.optim import CURATED, EvalWeights, OptimizerError, build_named, chosen_name, parse_optimizer_args
from sdft.stepping import ParamUpdater


def installed(name: str) -> bool:
    return importlib.util.find_spec(CURATED[name].target.split(".")[0]) is not None


# --------------------------------------------------------------------------- value syntax and precedence


def test_optimizer_args_follow_kohyas_value_syntax():
    parsed = parse_optimizer_args(["weight_decay=0.1", "betas=0.9,0.99", "decouple=True", "amsgrad=false",
                                   "beta3=None", "warmup_steps=100", "eps=1e-30,1e-3", "mode=fast", "d0=-1e-6"])
    assert parsed == {"weight_decay": 0.1, "betas": (0.9, 0.99), "decouple": True, "amsgrad": False, "beta3": None,
                      "warmup_steps": 100, "eps": (1e-30, 1e-3), "mode": "fast", "d0": -1e-6}
    assert isinstance(parsed["warmup_steps"], int) and isinstance(parsed["weight_decay"], float)


@pytest.mark.parametrize("items, named", [
    (["weight_decay"], "'weight_decay' is not key=value"),
    (["eps=1", "eps=2"], "'eps' twice"),
    (["lr=1e-3"], "--learning_rate"),
    (["params=x"], "'params'"),
])
def test_bad_optimizer_args_are_named(items, named):
    with pytest.raises(OptimizerError, match=named):
        parse_optimizer_args(items)


def test_optimizer_type_wins_and_the_older_flags_must_agree():
    assert chosen_name(None) == "adamw"
    assert chosen_name(None, "Prodigy") == "prodigy"
    assert chosen_name(None, "AdamW", use_8bit_adam=True) == "adamw8bit"
    assert chosen_name(None, "adafactor", use_8bit_adam=True) == "adafactor"   # ignored, as before (a warning)
    assert chosen_name("LION") == "lion"
    assert chosen_name("Adafactor", "adafactor") == "adafactor"
    assert chosen_name("PagedAdamW8bit", use_8bit_adam=True) == "pagedadamw8bit"
    assert chosen_name("torch.optim.SGD") == "torch.optim.SGD"
    with pytest.raises(OptimizerError, match="--optimizer prodigy and --optimizer_type Lion"):
        chosen_name("Lion", "prodigy")
    with pytest.raises(OptimizerError, match="--use_8bit_adam and --optimizer_type CAME"):
        chosen_name("CAME", use_8bit_adam=True)


# --------------------------------------------------------------------------- building


def test_any_importable_class_is_built_with_exactly_the_given_arguments():
    weight, bias = torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(3))
    optimizer = build_named("torch.optim.SGD", [{"params": [weight]}, {"params": [bias], "lr": 1e-5}], 0.01,
                            parse_optimizer_args(["momentum=0.9", "nesterov=True"]))
    assert type(optimizer) is torch.optim.SGD
    first, second = optimizer.param_groups
    assert (first["lr"], first["momentum"], first["nesterov"]) == (0.01, 0.9, True)
    assert (second["lr"], second["momentum"], second["nesterov"]) == (1e-5, 0.9, True)


def test_unknown_argument_names_it_and_what_the_optimizer_takes():
    with pytest.raises(OptimizerError) as err:
        optim.check_optimizer_args(torch.optim.SGD, "torch.optim.SGD", {"momentum": 0.9, "decouple": True})
    assert "'decouple'" in str(err.value) and "momentum" in str(err.value) and "nesterov" in str(err.value)


def test_missing_package_names_the_pip_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "came_pytorch" else real(name, *a))
    with pytest.raises(OptimizerError, match="--optimizer_type CAME needs the came-pytorch package: "
                                             "pip install came-pytorch"):
        optim.optimizer_class("came")


@pytest.mark.parametrize("name, message", [
    ("nosuchmodule.Optimizer", "cannot import nosuchmodule"),
    ("torch.optim.NoSuchThing", "has no optimizer class NoSuchThing"),
    ("torch.nn.Linear", "has no optimizer class Linear"),
    ("Sophia", "neither one of"),
])
def test_a_name_that_is_no_optimizer_is_refused(name, message):
    with pytest.raises(OptimizerError, match=message):
        optim.optimizer_class(name)


PER_TENSOR = [name for name, entry in CURATED.items() if entry.per_parameter]


@pytest.mark.parametrize("name", PER_TENSOR)
def test_a_per_tensor_optimizer_gives_the_same_update_one_tensor_at_a_time(name):
    """The claim --fused_backward_pass and --full_bf16 rely on (sdft.stepping.ParamUpdater). The
    8-bit optimizers quantise tensors of 4096+ values blockwise, so one tensor is that large."""
    if not installed(name):
        pytest.skip(f"{CURATED[name].pip} is not installed")
    torch.manual_seed(0)
    shapes = [(64, 80), (80,), (7, 5)]
    start = [torch.randn(shape) for shape in shapes]
    grads = [[torch.randn(shape) for shape in shapes] for _ in range(3)]
    results = []
    for one_at_a_time in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = build_named(name, [{"params": params[:2]}, {"params": params[2:], "lr": 5e-4}], 1e-3, {})
        updater = ParamUpdater(optimizer)
        for step_grads in grads:
            for param, grad in zip(params, step_grads):
                param.grad = grad.clone()
            if one_at_a_time:
                for param in params:
                    updater(param)
            else:
                optimizer.step()
        results.append(params)
    for whole, single in zip(*results):
        assert not torch.equal(whole.detach(), torch.zeros_like(whole))
        torch.testing.assert_close(single, whole, rtol=0, atol=1e-6)


def test_every_curated_optimizer_installed_here_builds():
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    for name, entry in CURATED.items():
        if installed(name):
            assert type(build_named(name, [{"params": params}], 1e-3, {})).__name__ == entry.target.rsplit(".")[-1]


# --------------------------------------------------------------------------- schedule-free


@pytest.mark.skipif(importlib.util.find_spec("schedulefree") is None, reason="schedulefree is not installed")
def test_eval_weights_swap_in_the_average_and_resume_from_them_exactly():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(8))
    optimizer = build_named("adamwschedulefree", [{"params": [param]}], 1e-2, {})
    weights = EvalWeights(optimizer)   # starts in train mode: schedule-free optimizers refuse to step in eval
    for _ in range(3):
        param.grad = torch.randn(8)
        optimizer.step()
    training = param.detach().clone()
    with weights.swapped_in():
        evaluation = param.detach().clone()
        saved_state = optimizer.state_dict()   # as a checkpoint saves it: in eval mode
    assert not torch.allclose(evaluation, training)
    torch.testing.assert_close(param.detach(), training, rtol=0, atol=1e-6)
    after_swap = param.detach().clone()

    restored = torch.nn.Parameter(evaluation.clone())   # a resumed run loads the checkpoint's weights...
    fresh = build_named("adamwschedulefree", [{"params": [restored]}], 1e-2, {})
    resumed = EvalWeights(fresh)
    fresh.load_state_dict(saved_state)                   # ...and the optimizer state, then resumes
    resumed.resume()
    assert torch.equal(restored.detach(), after_swap)
    assert not EvalWeights(torch.optim.SGD([param], lr=0.1)).active


# --------------------------------------------------------------------------- the command line


@pytest.fixture()
def base(tmp_path, monkeypatch) -> list[str]:
    """A model folder with nothing to load: parse-time checks only."""
    from sdft.tiny import make_images

    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    return [f"--pretrained_model_name_or_path={model}", f"--train_data_dir={make_images(tmp_path / 'd', 2)}"]


def parse_error(script, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("script", [t2i, sdxl, sd3], ids=["sd", "sdxl", "sd3"])
def test_every_script_takes_the_optimizer_flags(base, script, tmp_path):
    argv = base if script is not sd3 else [base[0], f"--instance_data_dir={tmp_path / 'd'}", "--instance_prompt=a"]
    args = script.parse_args(argv + ["--optimizer_type", "torch.optim.SGD", "--optimizer_args", "momentum=0.9",
                                     "nesterov=True"])
    assert args.optimizer_type == "torch.optim.SGD" and args.optimizer_args == ["momentum=0.9", "nesterov=True"]


@pytest.mark.parametrize("extra, named", [
    (["--optimizer_type", "torch.optim.SGD", "--optimizer_args", "momentum=0.9", "betas=0.9,0.99"],
     ["--optimizer_args", "'betas'", "nesterov"]),
    (["--optimizer_type", "Lion", "--optimizer", "prodigy"], ["--optimizer prodigy", "--optimizer_type Lion"]),
    (["--optimizer_type", "Lion", "--use_8bit_adam"], ["--use_8bit_adam", "--optimizer_type Lion"]),
    (["--optimizer_type", "Lion", "--adam_beta1", "0.8"], ["--adam_beta1", "--optimizer_type Lion",
                                                           "--optimizer_args"]),
    (["--optimizer_type", "ProdigyScheduleFree", "--prodigy_decouple", "False"],
     ["--prodigy_decouple", "--optimizer_type ProdigyScheduleFree", "decouple=..."]),
    (["--optimizer_type", "AdamWScheduleFree", "--lr_scheduler", "cosine"],
     ["--lr_scheduler cosine", "AdamWScheduleFree", "constant_with_warmup"]),
    (["--optimizer_type", "AdamWScheduleFree", "--fused_backward_pass"], ["--fused_backward_pass",
                                                                          "--optimizer_type AdamWScheduleFree"]),
    (["--optimizer", "prodigy", "--full_bf16", "--mixed_precision", "bf16"], ["--full_bf16", "--optimizer prodigy"]),
    (["--optimizer_type", "not.a.Module"], ["--optimizer_type not.a.Module", "cannot import"]),
])
def test_optimizer_mistakes_are_named_at_parse_time(base, capsys, extra, named):
    err = parse_error(t2i, base + extra, capsys)
    for text in named:
        assert text in err, err


def test_a_missing_package_is_an_error_with_the_pip_install_at_parse_time(base, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "schedulefree" else real(name, *a))
    err = parse_error(t2i, base + ["--optimizer_type", "adamwschedulefree"], capsys)
    assert "pip install schedulefree" in err


# --------------------------------------------------------------------------- per-group learning rates


@pytest.mark.parametrize("name", [name for name in CURATED if name != "prodigy"])
def test_every_optimizer_keeps_each_groups_learning_rate_through_the_schedule(name):
    """The groups of sdft.trainable.param_groups (denoiser, text encoders, new tokens), built once,
    keep their own rates in any optimizer, and the LR schedule scales each one (Prodigy, which
    takes one rate, aside: the builder drops the others with a warning)."""
    if not installed(name):
        pytest.skip(f"{CURATED[name].pip} is not installed")
    from sdft.trainable import param_groups

    trained = {"unet": torch.nn.Linear(64, 80), "text_encoder": torch.nn.Linear(64, 80)}
    groups = param_groups(trained, "unet", text_encoder_lr=5e-5, text_encoder_weight_decay=1e-3,
                          new_token_params=[torch.nn.Parameter(torch.zeros(2, 64))])
    assert [group["name"] for group in groups] == ["unet", "text_encoders", "new_tokens"]
    optimizer = build_named(name, groups, 1e-3, {})
    EvalWeights(optimizer)   # schedule-free ones: into train mode, as the builder does
    schedule = optim.build_lr_scheduler("constant_with_warmup", optimizer, warmup_steps=2, total_steps=4,
                                        num_processes=1)
    assert [group["lr"] for group in optimizer.param_groups] == [0.0, 0.0, 0.0]
    for module in trained.values():
        module.weight.grad = torch.ones_like(module.weight)
    optimizer.step()
    schedule.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([5e-4, 2.5e-5, 5e-4])
    assert [group["name"] for group in optimizer.param_groups] == ["unet", "text_encoders", "new_tokens"]


def test_the_log_shows_each_groups_rate_by_name():
    from sdft.trainer import group_rates

    unet, encoder = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([{"params": [unet], "name": "unet"}, {"params": [encoder], "name": "text_encoders",
                                                                     "lr": 5e-5}], lr=1e-3)
    schedule = optim.build_lr_scheduler("constant", optimizer, warmup_steps=0, total_steps=4, num_processes=1)
    assert group_rates(optimizer, schedule) == {"lr/unet": 1e-3, "lr/text_encoders": 5e-5}
    assert group_rates(torch.optim.SGD([unet], lr=1e-3), schedule) == {}
