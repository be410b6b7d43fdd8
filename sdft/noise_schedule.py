"""Scheduler settings a run changes from the base model's: the prediction type and zero terminal SNR.

Zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
arXiv 2305.08891): the betas are rescaled so that the last timestep is pure noise (diffusers'
`rescale_betas_zero_snr`), and sampling starts from that timestep ("trailing" spacing, section
3.3). It is undefined for epsilon prediction (the model would have to predict the noise from the
noise alone at the last step; section 3.2), so it goes with v-prediction. The same settings are
the ones ComfyUI and Forge apply for a checkpoint's `v_pred` / `ztsnr` marker keys.
"""

from __future__ import annotations

import inspect

from diffusers import DDIMScheduler

ZTSNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def settings_for(prediction_type: str | None, zero_terminal_snr: bool) -> dict:
    """Only what changes: an empty dict leaves the base model's scheduler as it is."""
    return {**({"prediction_type": prediction_type} if prediction_type else {}), **(ZTSNR if zero_terminal_snr else {})}


def scheduler_with(scheduler, settings: dict):
    """The same scheduler with `settings`; one that cannot rescale its betas (PNDM, the SD 1.x
    default) is replaced by DDIM, which can."""
    if not settings:
        return scheduler
    cls = type(scheduler)
    if "rescale_betas_zero_snr" in settings and "rescale_betas_zero_snr" not in inspect.signature(cls).parameters:
        cls = DDIMScheduler
    return cls.from_config(scheduler.config, **settings)


def markers_of(scheduler_config) -> tuple[str, ...]:
    """The marker keys a single-file checkpoint of a model with this scheduler carries."""
    return tuple(name for name, on in (("v_pred", scheduler_config.get("prediction_type") == "v_prediction"),
                                       ("ztsnr", bool(scheduler_config.get("rescale_betas_zero_snr")))) if on)


def check_zero_terminal_snr(prediction_type: str, zero_terminal_snr: bool, where: str) -> str | None:
    """The error message for epsilon prediction with zero terminal SNR, else None."""
    if zero_terminal_snr and prediction_type == "epsilon":
        return (f"Zero terminal SNR ({where}) needs v-prediction: with epsilon prediction the last timestep, pure "
                "noise, has nothing left to predict (Lin et al. 2023, section 3.2). Add --prediction_type "
                "v_prediction.")
    return None
