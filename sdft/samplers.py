"""Sampler names as the UIs spell them (A1111, ComfyUI, kohya's `--sample_sampler`), mapped to the
diffusers scheduler that implements each, configured from the pipeline's own scheduler config.

The mapping is the table in diffusers' scheduler overview ("A1111/k-diffusion -> Diffusers"): DPM++ 2M
is `DPMSolverMultistepScheduler`, its Karras variant adds `use_karras_sigmas=True`, the SDE variant
`algorithm_type="sde-dpmsolver++"`, and so on. Each scheduler is built with `from_config` of the base
model's scheduler, so the beta schedule, timestep spacing and offsets stay the model's (that is what
the UIs do with a model's own schedule). kohya #765 is the bug this avoids: a trainer-only default
sampler made samples look worse than what users then saw in their UI.

Flow-matching models (SD3) take only the flow samplers: Euler (the pipeline's default) and Heun.
"""

from __future__ import annotations

import importlib.util

import diffusers

KARRAS = (("use_karras_sigmas", True),)

# normalised name -> (diffusers class name, options for from_config)
SAMPLERS: dict[str, tuple[str, tuple]] = {
    "ddim": ("DDIMScheduler", ()),
    "pndm": ("PNDMScheduler", ()),
    "euler": ("EulerDiscreteScheduler", ()),
    "euler karras": ("EulerDiscreteScheduler", KARRAS),
    "euler a": ("EulerAncestralDiscreteScheduler", ()),
    "heun": ("HeunDiscreteScheduler", ()),
    "heun karras": ("HeunDiscreteScheduler", KARRAS),
    "lms": ("LMSDiscreteScheduler", ()),
    "lms karras": ("LMSDiscreteScheduler", KARRAS),
    "dpm2": ("KDPM2DiscreteScheduler", ()),
    "dpm2 karras": ("KDPM2DiscreteScheduler", KARRAS),
    "dpm2 a": ("KDPM2AncestralDiscreteScheduler", ()),
    "dpm2 a karras": ("KDPM2AncestralDiscreteScheduler", KARRAS),
    "dpmsolver": ("DPMSolverMultistepScheduler", (("algorithm_type", "dpmsolver"),)),
    "dpm++ 2m": ("DPMSolverMultistepScheduler", (("algorithm_type", "dpmsolver++"), ("solver_order", 2))),
    "dpm++ 2m karras": ("DPMSolverMultistepScheduler",
                        (("algorithm_type", "dpmsolver++"), ("solver_order", 2)) + KARRAS),
    "dpm++ 2m sde": ("DPMSolverMultistepScheduler", (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2))),
    "dpm++ 2m sde karras": ("DPMSolverMultistepScheduler",
                            (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2)) + KARRAS),
    "dpm++ sde": ("DPMSolverSinglestepScheduler", ()),
    "dpm++ sde karras": ("DPMSolverSinglestepScheduler", KARRAS),
    "unipc": ("UniPCMultistepScheduler", ()),
    "deis": ("DEISMultistepScheduler", ()),
}

FLOW_SAMPLERS: dict[str, tuple[str, tuple]] = {
    "euler": ("FlowMatchEulerDiscreteScheduler", ()),
    "heun": ("FlowMatchHeunDiscreteScheduler", ()),
}

# Other spellings users type: kohya's names (k_*, dpmsolver++, dpmsingle, dpm_2_a) and the UIs'.
ALIASES = {
    "k euler": "euler", "k euler a": "euler a", "euler ancestral": "euler a", "k lms": "lms", "k heun": "heun",
    "dpm 2": "dpm2", "k dpm 2": "dpm2", "dpm 2 a": "dpm2 a", "k dpm 2 a": "dpm2 a", "dpm2 ancestral": "dpm2 a",
    "dpmsolver++": "dpm++ 2m", "dpmpp 2m": "dpm++ 2m", "dpmpp 2m karras": "dpm++ 2m karras",
    "dpmpp 2m sde": "dpm++ 2m sde", "dpmpp 2m sde karras": "dpm++ 2m sde karras", "dpmsingle": "dpm++ sde",
    "dpmpp sde": "dpm++ sde", "dpmpp sde karras": "dpm++ sde karras", "flow euler": "euler",
    "flowmatch euler": "euler", "flow heun": "heun",
}


# Schedulers that need a package besides torch (diffusers' own optional dependencies).
NEEDS = {"LMSDiscreteScheduler": "scipy"}


def table(flow: bool) -> dict[str, tuple[str, tuple]]:
    return FLOW_SAMPLERS if flow else SAMPLERS


def canonical(name: str, flow: bool = False) -> str:
    """The table key of `name` ('Euler_a', 'k_euler_a' and 'euler a' are one sampler); ValueError
    listing the choices when this family has no such sampler."""
    key = " ".join(name.lower().replace("_", " ").split())
    key = ALIASES.get(key, key)
    if key not in table(flow):
        kind = "flow-matching (SD3) " if flow else ""
        raise ValueError(f"unknown {kind}sampler '{name}'; choose one of: {', '.join(table(flow))}")
    return key


def missing_package(name: str, flow: bool = False) -> str | None:
    """The package sampler `name` needs and this environment lacks (None: it can run)."""
    package = NEEDS.get(table(flow)[canonical(name, flow)][0])
    return package if package and importlib.util.find_spec(package) is None else None


def make_scheduler(name: str, base, prediction_type: str | None = None):
    """The scheduler of sampler `name`, from the config of `base` (the pipeline's scheduler). A flow
    base takes the flow table; `prediction_type` (the trained one) overrides the config's."""
    flow = "FlowMatch" in type(base).__name__
    class_name, options = table(flow)[canonical(name, flow)]
    extra = dict(options)
    if prediction_type is not None and not flow:
        extra["prediction_type"] = prediction_type
    return getattr(diffusers, class_name).from_config(base.config, **extra)
