"""Optimizers and learning-rate schedules.

`--optimizer_type NAME --optimizer_args k=v ...` (kohya sd-scripts' names and value syntax): NAME
is a curated short name (`CURATED`, each with the package to install) or any importable
`module.Class`. `chosen_name` settles which flag wins, `optimizer_class` imports it (a missing
package is an error naming the `pip install`), `check_optimizer_args` holds the arguments to the
class's signature: all at parse time (sdft.checks), before any model loads. `build_named` builds
it. `EvalWeights` gives schedule-free optimizers' evaluation weights to validation, checkpoints and
the export."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from diffusers.optimization import get_scheduler

LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant"]
OPTIMIZERS = ("adamw", "prodigy", "adafactor")   # --optimizer, case-insensitive


@dataclass(frozen=True)
class AdamSettings:
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    use_8bit: bool = False


def build_adamw(param_groups: list[dict], settings: AdamSettings) -> torch.optim.Optimizer:
    """`param_groups` are torch param groups; groups may override lr and weight_decay."""
    return build_named("adamw8bit" if settings.use_8bit else "adamw", param_groups, settings.lr,
                       {"betas": settings.betas, "weight_decay": settings.weight_decay, "eps": settings.eps})


def scaled_lr(lr: float, gradient_accumulation_steps: int, batch_size: int, num_processes: int) -> float:
    """--scale_lr: keep the per-sample step size when the effective batch grows."""
    return lr * gradient_accumulation_steps * batch_size * num_processes


def build_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                       num_processes: int, num_cycles: int = 1, power: float = 1.0):
    """Step counts are in optimizer steps. accelerate's prepared scheduler advances `num_processes`
    times per optimizer step (diffusers PR #8312), so both counts are scaled by it here, in one
    place, for every script (upstream SDXL scales by accumulation steps instead: #9633)."""
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps * num_processes,
                         num_training_steps=total_steps * num_processes, num_cycles=num_cycles, power=power)


@dataclass(frozen=True)
class AdafactorSettings:
    lr: float
    weight_decay: float = 0.0
    clip_threshold: float = 1.0
    decay_rate: float = -0.8


def build_adafactor(param_groups: list[dict], settings: AdafactorSettings) -> torch.optim.Optimizer:
    """Adafactor (Shazeer & Stern 2018, arXiv 1804.04235): factored second moments (a row and a column
    vector per matrix instead of a full tensor) and no first moment, so its state is a small fraction
    of AdamW's 8 bytes per parameter. Its own relative step size, parameter scaling and warmup are
    off (CURATED's defaults): the learning rate is ours, set by the LR schedule like any other's."""
    return build_named("adafactor", param_groups, settings.lr,
                       {"weight_decay": settings.weight_decay, "clip_threshold": settings.clip_threshold,
                        "decay_rate": settings.decay_rate})


# --------------------------------------------------------------------------- --optimizer_type and --optimizer_args


@dataclass(frozen=True)
class Curated:
    """An optimizer users name by a short name (kohya sd-scripts' names, case-insensitive).

    `pip`: the package to install ("" when it comes with the core requirements). `defaults`: our
    arguments unless --optimizer_args overrides them. `per_parameter`: its update of one tensor reads
    only that tensor's gradient and state, so it can be applied one tensor at a time
    (--fused_backward_pass, --full_bf16); Prodigy's step size is estimated from all parameters at
    once and schedule-free optimizers keep per-group running sums, so they cannot."""

    name: str
    target: str
    pip: str = ""
    defaults: tuple[tuple[str, object], ...] = ()
    per_parameter: bool = True


CURATED = {entry.name.lower(): entry for entry in (
    Curated("AdamW", "torch.optim.AdamW"),
    Curated("AdamW8bit", "bitsandbytes.optim.AdamW8bit", "bitsandbytes"),
    Curated("PagedAdamW8bit", "bitsandbytes.optim.PagedAdamW8bit", "bitsandbytes"),
    # Lion (Chen et al. 2023, arXiv 2302.06675): sign of an interpolated momentum; wants a 3-10x
    # smaller learning rate and a larger weight decay than AdamW.
    Curated("Lion", "lion_pytorch.Lion", "lion-pytorch"),
    Curated("Lion8bit", "bitsandbytes.optim.Lion8bit", "bitsandbytes"),
    Curated("Prodigy", "prodigyopt.Prodigy", "prodigyopt", per_parameter=False),
    Curated("ProdigyScheduleFree", "prodigyplus.ProdigyPlusScheduleFree", "prodigy-plus-schedule-free",
            per_parameter=False),
    # Its own relative step size, parameter scaling and warmup off: the learning rate is ours.
    Curated("Adafactor", "transformers.optimization.Adafactor",
            defaults=(("relative_step", False), ("scale_parameter", False), ("warmup_init", False))),
    # CAME (Luo et al. 2023, arXiv 2307.02047): Adafactor's factored memory with a confidence-guided update.
    Curated("CAME", "came_pytorch.CAME", "came-pytorch"),
    # Schedule-free (Defazio et al. 2024, arXiv 2405.15682): iterate averaging instead of a decaying schedule.
    Curated("AdamWScheduleFree", "schedulefree.AdamWScheduleFree", "schedulefree", per_parameter=False),
    Curated("RAdamScheduleFree", "schedulefree.RAdamScheduleFree", "schedulefree", per_parameter=False),
    Curated("SGDScheduleFree", "schedulefree.SGDScheduleFree", "schedulefree", per_parameter=False),
    # AdEMAMix (Pagliardini et al. 2024, arXiv 2409.03137): a second, slow momentum mixed in.
    Curated("AdEMAMix", "bitsandbytes.optim.AdEMAMix", "bitsandbytes"),
    Curated("AdEMAMix8bit", "bitsandbytes.optim.AdEMAMix8bit", "bitsandbytes"),
    Curated("SGDNesterov", "torch.optim.SGD", defaults=(("momentum", 0.9), ("nesterov", True))),
)}
# The optimizers the existing --adam_* flags configure (and --use_8bit_adam picks).
ADAM_FAMILY = ("adamw", "adamw8bit", "pagedadamw8bit")
RESERVED_ARGS = {"params": "the trained parameters are passed by the script",
                 "lr": "set the learning rate with --learning_rate (the LR schedule scales it)"}
SCHEDULE_FREE_SCHEDULES = ("constant", "constant_with_warmup")


class OptimizerError(ValueError):
    """A bad --optimizer_type/--optimizer_args; the message names the flag."""


def parse_optimizer_value(text: str):
    """kohya's value syntax: `True`/`False`/`None`, ints, floats, comma-separated tuples
    (`betas=0.9,0.99`), anything else a string."""
    if "," in text:
        return tuple(parse_optimizer_value(part) for part in text.split(",") if part.strip())
    stripped = text.strip()
    words = {"true": True, "false": False, "none": None}
    if stripped.lower() in words:
        return words[stripped.lower()]
    for convert in (int, float):
        try:
            return convert(stripped)
        except ValueError:
            pass
    return stripped.strip("'\"")


def parse_optimizer_args(items: list[str] | None) -> dict:
    """`["weight_decay=0.1", "betas=0.9,0.99"]` -> {"weight_decay": 0.1, "betas": (0.9, 0.99)}."""
    parsed = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise OptimizerError(f"--optimizer_args '{item}' is not key=value (e.g. weight_decay=0.01 betas=0.9,0.99).")
        if key in parsed:
            raise OptimizerError(f"--optimizer_args gives '{key}' twice.")
        if key in RESERVED_ARGS:
            raise OptimizerError(f"--optimizer_args cannot set '{key}': {RESERVED_ARGS[key]}.")
        parsed[key] = parse_optimizer_value(value)
    return parsed


def chosen_name(optimizer_type: str | None, optimizer: str = "AdamW", use_8bit_adam: bool = False) -> str:
    """The optimizer a command line asks for: a curated name in lower case, or `module.Class`.

    --optimizer_type wins; the older flags must then agree with it: --optimizer (AdamW, Prodigy,
    Adafactor) names the same optimizer or is left at its default, and --use_8bit_adam goes only with
    an 8-bit AdamW. Without --optimizer_type, --optimizer picks, and --use_8bit_adam makes AdamW 8-bit
    (ignored, with a warning at parse time, for Prodigy and Adafactor, as before)."""
    legacy = optimizer.lower()
    if optimizer_type is None:
        return "adamw8bit" if use_8bit_adam and legacy == "adamw" else legacy
    name = optimizer_type.lower() if optimizer_type.lower() in CURATED else optimizer_type
    if legacy != "adamw" and legacy != name:
        raise OptimizerError(f"--optimizer {optimizer} and --optimizer_type {optimizer_type} name different "
                             "optimizers; give only --optimizer_type.")
    if use_8bit_adam and name not in ("adamw8bit", "pagedadamw8bit"):
        raise OptimizerError(f"--use_8bit_adam and --optimizer_type {optimizer_type} contradict each other; "
                             "for 8-bit AdamW give --optimizer_type AdamW8bit alone.")
    return name


def display_name(name: str) -> str:
    return CURATED[name].name if name in CURATED else name


def optimizer_class(name: str) -> type:
    """The class of a curated name or of an importable `module.Class`; a missing package is an
    error naming the `pip install` to run."""
    entry = CURATED.get(name)
    target = entry.target if entry else name
    module_name, _, class_name = target.rpartition(".")
    if not module_name:
        raise OptimizerError(f"--optimizer_type '{name}' is neither one of {', '.join(e.name for e in CURATED.values())} "
                             "nor an importable module.Class (e.g. torch.optim.SGD).")
    if entry is not None and entry.pip and importlib.util.find_spec(module_name.split(".")[0]) is None:
        raise OptimizerError(f"--optimizer_type {entry.name} needs the {entry.pip} package: pip install {entry.pip}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise OptimizerError(f"--optimizer_type {name}: cannot import {module_name} ({err}).") from err
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise OptimizerError(f"--optimizer_type {name}: {module_name} has no optimizer class {class_name}.")
    return cls


def check_optimizer_args(cls: type, name: str, kwargs: dict) -> None:
    """Every argument must be one the optimizer's constructor takes (unless it takes **kwargs)."""
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    known = [key for key in parameters if key not in ("self", "params")]
    unknown = [key for key in kwargs if key not in known]
    if unknown:
        raise OptimizerError(f"--optimizer_args: {display_name(name)} has no argument {', '.join(map(repr, unknown))}; "
                             f"it takes: {', '.join(known)}.")


def is_schedule_free(cls: type) -> bool:
    """Schedule-free optimizers have train()/eval() modes that swap the parameters between the
    training point and the averaged (evaluation) point; torch's own optimizers have neither."""
    return callable(getattr(cls, "eval", None)) and callable(getattr(cls, "train", None))


def check_schedule(cls: type, name: str, lr_scheduler: str) -> None:
    if is_schedule_free(cls) and lr_scheduler not in SCHEDULE_FREE_SCHEDULES:
        raise OptimizerError(
            f"--lr_scheduler {lr_scheduler} cannot be used with the schedule-free {display_name(name)}: it averages "
            "its iterates in place of a decaying schedule (Defazio et al. 2024, arXiv 2405.15682), so a decay on "
            "top would stop the average from moving; use --lr_scheduler constant or constant_with_warmup.")


def per_parameter(name: str) -> bool:
    """Whether the optimizer may be applied one tensor at a time; unknown classes are assumed not to."""
    return name in CURATED and CURATED[name].per_parameter


# Which of the --adam_* flags' values each optimizer takes (the others configure theirs with --optimizer_args).
FLAG_ARGUMENTS = {"adamw": ("betas", "eps", "weight_decay"), "adamw8bit": ("betas", "eps", "weight_decay"),
                  "pagedadamw8bit": ("betas", "eps", "weight_decay"), "prodigy": ("betas", "eps", "weight_decay"),
                  "adafactor": ("weight_decay",)}
ADAM_FLAGS = {"adam_beta1": "betas", "adam_beta2": "betas", "adam_epsilon": "eps", "adam_weight_decay": "weight_decay"}


def flag_arguments(name: str, values: dict) -> dict:
    """The subset of `values` (betas, eps, weight_decay from the --adam_* flags) that `name` takes."""
    return {key: values[key] for key in FLAG_ARGUMENTS.get(name, ())}


def unused_adam_flags(name: str, typed: set[str]) -> list[str]:
    """The --adam_* flags typed on the command line that the chosen optimizer would ignore."""
    taken = FLAG_ARGUMENTS.get(name, ())
    return [flag for flag, key in ADAM_FLAGS.items() if flag in typed and key not in taken]


def build_named(name: str, param_groups: list[dict], lr: float, kwargs: dict) -> torch.optim.Optimizer:
    """Any optimizer by curated name or `module.Class`: our defaults, then `kwargs` (the flags'
    values and --optimizer_args, which win)."""
    cls = optimizer_class(name)
    entry = CURATED.get(name)
    kwargs = {**dict(entry.defaults if entry else ()), "lr": lr, **kwargs}
    if cls is torch.optim.AdamW and "foreach" not in kwargs:
        # One fused kernel per step instead of a loop over tensors: 2-3x faster full fine-tuning steps
        # where the optimizer dominates (benchmarks/README.md: 64% of an SD-1.5 UNet step on the CPU).
        kwargs.setdefault("fused", all(p.device.type in ("cuda", "cpu") and p.is_floating_point()
                                       for group in param_groups for p in group["params"]))
    return cls(param_groups, **kwargs)


class EvalWeights:
    """The weights a run is judged and exported by.

    Schedule-free optimizers train at one point and average toward another: the parameters hold
    the training point y in train mode and the average x, the weights to evaluate and ship, in eval
    mode (Defazio et al. 2024). kohya PR #1250's review found validation and saving done on y;
    `swapped_in()` is the one place that switches to x (validation images, val_loss, checkpoints'
    weights, the final export) and back. The optimizer state (z and the moments) is the same in
    both modes and records the mode it was saved in, so a checkpoint written in eval mode resumes by
    loading x and the state, then `resume()` (train mode) recomputes y exactly as the uninterrupted
    run does after its own save. For every other optimizer it does nothing."""

    def __init__(self, optimizer):
        inner = getattr(optimizer, "optimizer", optimizer)   # accelerate's wrapper forwards train()/eval()
        self.optimizer = optimizer if is_schedule_free(type(inner)) else None
        self.resume()   # schedule-free optimizers start in eval mode and refuse to step in it

    @classmethod
    def none(cls) -> "EvalWeights":
        """For runs (and tests) whose optimizer is not schedule-free."""
        return cls(None)

    @property
    def active(self) -> bool:
        return self.optimizer is not None

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        if self.optimizer is None:
            yield
            return
        self.optimizer.eval()
        try:
            yield
        finally:
            self.optimizer.train()

    def resume(self) -> None:
        """Back to the training point (after loading a checkpoint saved in eval mode)."""
        if self.optimizer is not None:
            self.optimizer.train()
