"""Parse-time checks: each raises `CliError` with a message that names the flag, so a bad command
line fails before any model is loaded. Every check takes the parsed namespace and the set of flags
the user typed (as opposed to defaults). `COMMON` is the list every script runs; each script adds
its own checks after it."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import AbstractSet, Sequence

import torch

from sdft import quantization, sample_prompts, samplers
from sdft.adapter_blocks import parse_network_args
from sdft.checkpointing import resolve_resume
from sdft.cli import TRACKERS
from sdft.data.archives import ARCHIVE_SUFFIXES, is_archive
from sdft.data.buckets import BucketSettings, bucket_sizes
from sdft.data.cache_store import prepare_folder
from sdft.data.caches import cache_folder
from sdft.data.dataset_config import read_dataset_config
from sdft.errors import CliError, DataError
from sdft.families.base_file import check_vae_file, inspect, is_single_file, offline
from sdft.noise_schedule import check_zero_terminal_snr
from sdft.objectives import (
    ResolutionShift,
    validate_flow_shift,
    validate_input_perturbation,
    validate_loss_type,
    validate_multires_noise,
    validate_noise_offset,
    validate_pos_emb_random_crop_rate,
    validate_timestep_bias,
    validate_timestep_window,
)
from sdft.optim import (
    ADAM_FLAGS,
    LR_SCHEDULERS,
    OPTIMIZERS,
    OptimizerError,
    check_optimizer_args,
    check_schedule,
    chosen_name,
    optimizer_class,
    parse_optimizer_args,
    per_parameter,
    unused_adam_flags,
)
from sdft.sharding import EngineConfig, RunShape, refusals
from sdft.textual_inversion import TokenPlan, check_abstractions_used

Given = AbstractSet[str]   # the dests typed on the command line
LATENT_MULTIPLE = 8        # the VAE's downsampling: bucket sides are multiples of it
SD3_LATENT_MULTIPLE = 16   # SD3: VAE 8 x transformer patch 2
# Issue 16: SD3 puts CLIP-L/G states (77 positions, channels side by side) before T5's on the sequence
# axis; diffusers' pipeline, kohya's SD3 scripts and Stability's reference inference code (which encodes
# only the first 77-token window) all give CLIP one 77-token sequence, so chunked CLIP states would
# train a conditioning those readers never produce. T5 is SD3's channel for long text.
SD3_LONG_PROMPTS = ("--max_token_length (75-token CLIP chunks) is for SD 1.x/2.x and SDXL. SD3 reads long captions "
                    "through T5: raise --max_sequence_length (T5 tokens, up to 512; the pipeline takes the same "
                    "max_sequence_length at inference). SD3's CLIP-L/G part stays one 77-token sequence, as diffusers' "
                    "SD3 pipeline, kohya's SD3 scripts and Stability's reference code encode it; chunks there would "
                    "train a conditioning that inference does not give.")


def dataset_config_defaults(args: argparse.Namespace) -> dict:
    """The command-line values a --dataset_config overrides, under kohya's key names. random_crop is
    the opposite of --center_crop: without --center_crop our crops are random."""
    return {
        "resolution": args.resolution, "batch_size": args.train_batch_size, "enable_bucket": args.enable_bucket,
        "min_bucket_reso": args.min_bucket_reso, "max_bucket_reso": args.max_bucket_reso,
        "bucket_reso_steps": args.bucket_reso_steps, "bucket_no_upscale": args.bucket_no_upscale,
        "num_repeats": 1, "caption_extension": args.caption_extension, "keep_tokens": args.keep_tokens,
        "keep_tokens_separator": args.keep_tokens_separator, "shuffle_caption": args.shuffle_caption,
        "caption_separator": args.caption_separator, "secondary_separator": args.secondary_separator,
        "caption_dropout_rate": args.caption_dropout_rate,
        "caption_dropout_every_n_epochs": args.caption_dropout_every_n_epochs,
        "caption_tag_dropout_rate": args.caption_tag_dropout_rate, "flip_aug": args.random_flip,
        "random_crop": not args.center_crop,
        # Config keys only: our --caption_prefix prefixes generated captions (--caption_model).
        "caption_prefix": "", "caption_suffix": "", "enable_wildcard": False,
    }


def subset_conflicts(args: argparse.Namespace) -> list[str]:
    """Flags a --dataset_config or N_name-folder run cannot honour yet (each subset is read as it is)."""
    conflicts = {
        "--validation_split": args.validation_split > 0, "--validation_data_dir": args.validation_data_dir is not None,
        "--max_train_samples": args.max_train_samples is not None,
        "--caption_model": args.caption_model is not None, "--upscale_model": args.upscale_model is not None,
        "--masked_loss": args.masked_loss, "--crop_to_mask": args.crop_to_mask, "--alpha_mask": args.alpha_mask,
        "--mask_data_dir": args.mask_data_dir is not None, "--mask_model": args.mask_model is not None,
        "--with_prior_preservation (use an is_reg subset)": args.with_prior_preservation,
        "--proportion_empty_prompts (use caption_dropout_rate)": args.proportion_empty_prompts > 0,
        "--repeats (use num_repeats)": args.repeats != 1,
    }
    return [flag for flag, on in conflicts.items() if on]


def check_positive(args: argparse.Namespace, given: Given) -> None:
    check_finite_floats(args)
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                 "resolution", "num_train_epochs", "validation_epochs"):
        if getattr(args, name, 1) < 1:
            raise CliError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise CliError(f"--seed must be between 0 and 2**32 - 1, got {args.seed}.")
    check_skip_nan_steps(args)
    for name in ("max_train_steps", "checkpoints_total_limit", "max_train_samples"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise CliError(f"--{name} must be at least 1, got {value}.")
    if args.resolution % 8:
        raise CliError(f"--resolution must be a multiple of 8 (the VAE downsamples by 8), got {args.resolution}.")
    if args.learning_rate <= 0:
        raise CliError(f"--learning_rate must be positive, got {args.learning_rate}.")
    if args.max_grad_norm is not None and args.max_grad_norm <= 0:
        raise CliError(f"--max_grad_norm must be positive, got {args.max_grad_norm}.")
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise CliError(f"--lr_scheduler '{args.lr_scheduler}' is unknown; choose one of: {', '.join(LR_SCHEDULERS)}.")
    if args.dataloader_num_workers < 0:
        raise CliError("--dataloader_num_workers cannot be negative.")


def check_skip_nan_steps(args: argparse.Namespace) -> None:
    if args.skip_nan_steps < 0:
        raise CliError(f"--skip_nan_steps cannot be negative, got {args.skip_nan_steps}.")
    if args.skip_nan_steps and args.fused_backward_pass:
        raise CliError("--skip_nan_steps cannot be combined with --fused_backward_pass: the update runs during the "
                       "backward pass, before the loss and gradients can be checked.")


# Float flags for which infinity means something: no clipping.
INFINITY_ALLOWED = {"max_grad_norm"}


def check_finite_floats(args: argparse.Namespace) -> None:
    """argparse's float() accepts 'nan' and 'inf'; no float flag means anything with NaN, and an
    infinite learning rate or weight only fails after the models are loaded."""
    for name, value in vars(args).items():
        if name.startswith("_") or not isinstance(value, float) or math.isfinite(value):
            continue
        if math.isinf(value) and name in INFINITY_ALLOWED:
            continue
        raise CliError(f"--{name} must be a finite number, got {value}.")


def check_output_dir(args: argparse.Namespace, given: Given) -> None:
    path = Path(args.output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise CliError(f"--output_dir '{args.output_dir}' is an existing file; give a folder (it is created "
                       "if missing).")
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise CliError(f"--output_dir '{args.output_dir}' cannot be created: {blocking} is a file.")


# Components the scripts load from a pipeline folder; the others (safety checker, feature extractor,
# image encoder) are never read, so a folder without them still trains.
LOADED_COMPONENTS = ("unet", "transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3",
                     "tokenizer", "tokenizer_2", "tokenizer_3")


def check_model_path(args: argparse.Namespace, given: Given) -> None:
    """A local model folder must exist and hold a diffusers pipeline; Hub ids are checked at load time.
    Single files are checked by each script's check_base_file, which knows the family."""
    if "single_file_config" in given and not is_single_file(args.pretrained_model_name_or_path):
        raise CliError("--single_file_config gives the configs of a single-file --pretrained_model_name_or_path; "
                       f"'{args.pretrained_model_name_or_path}' is not a file.")
    if args.single_file_config:
        check_pipeline_folder("--single_file_config", args.single_file_config, "model_index.json")
    if is_single_file(args.pretrained_model_name_or_path):
        return
    check_pipeline_folder("--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "model_index.json")
    check_pipeline_components(args.pretrained_model_name_or_path,
                              skip={"vae"} if getattr(args, "pretrained_vae_model_name_or_path", None) else set())
    vae = getattr(args, "pretrained_vae_model_name_or_path", None)
    if vae and is_single_file(vae):
        check_vae_file(vae)
    elif vae:
        check_pipeline_folder("--pretrained_vae_model_name_or_path", vae, "config.json")


def check_base_file(args: argparse.Namespace, given: Given, *, family: str) -> None:
    """A single-file base: readable, of this script's family, and with a config source (issue 16)."""
    if not is_single_file(args.pretrained_model_name_or_path):
        return
    inspect(args.pretrained_model_name_or_path, family)
    if args.single_file_config is None and offline():
        raise CliError(f"--pretrained_model_name_or_path '{args.pretrained_model_name_or_path}' is a single file and "
                       "the Hub is offline (HF_HUB_OFFLINE): give --single_file_config, the diffusers folder of its "
                       "base model, for the component configs.")


def base_prediction_type(model: str, single_file_config: str | None) -> str | None:
    """What a local base predicts, when that is known without loading it (None for Hub ids)."""
    if is_single_file(model):
        if inspect(model, None).v_pred:
            return "v_prediction"
        model = single_file_config or ""
    config = local_scheduler_config(model) if model else None
    return config.get("prediction_type", "epsilon") if config is not None else None


def base_has_ztsnr(model: str) -> bool:
    if is_single_file(model):
        return inspect(model, None).ztsnr
    config = local_scheduler_config(model)
    return bool(config and config.get("rescale_betas_zero_snr"))


def local_scheduler_config(model: str) -> dict | None:
    path = Path(model).expanduser() / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def check_pipeline_folder(flag: str, value: str, marker: str) -> None:
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise CliError(f"{flag} '{value}' is a file; a diffusers folder (with {marker}) or a Hub id is needed "
                       "(single-file checkpoints are not supported).")
    if path.is_dir() and not (path / marker).is_file():
        raise CliError(f"{flag} '{value}' is not a diffusers folder (no {marker}).")
    if not path.exists() and _looks_local(value):
        raise CliError(f"{flag} '{value}' does not exist.")


def check_pipeline_components(value: str, skip: set[str]) -> None:
    """Every component that model_index.json lists and the scripts load must have its folder;
    otherwise diffusers reports a missing config.json without saying which component is absent."""
    index_file = Path(value).expanduser() / "model_index.json"
    if not index_file.is_file():
        return
    try:
        index = json.loads(index_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CliError(f"--pretrained_model_name_or_path: {index_file} is not valid JSON: {err}") from err
    listed = {name for name, entry in index.items() if isinstance(entry, list) and entry and entry[0] is not None}
    missing = sorted(name for name in listed & set(LOADED_COMPONENTS) - skip
                     if not (index_file.parent / name).is_dir())
    if missing:
        raise CliError(f"--pretrained_model_name_or_path '{value}' lacks the component folder(s) "
                       f"{', '.join(name + '/' for name in missing)} that its model_index.json lists.")


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or os.path.isdir(path)


def check_t2i_dataset(args: argparse.Namespace) -> None:
    if args.dataset_name is None and args.train_data_dir is None:
        raise CliError("Give a dataset: --dataset_name (Hub id or local dataset) or --train_data_dir (image folder).")
    check_data_dir("--train_data_dir", args.train_data_dir)
    if args.dataset_name is not None and _looks_local(args.dataset_name) and not Path(args.dataset_name).exists():
        raise CliError(f"--dataset_name '{args.dataset_name}' does not exist.")


def check_data_dir(flag: str, value: str | None) -> None:
    """A folder, or an archive file (.zip, .tar, .tar.gz, .tgz) extracted before training."""
    if value is None or Path(value).is_dir():
        return
    if is_archive(value) and Path(value).is_file():
        return
    raise CliError(f"{flag} '{value}' is not a folder or an archive ({', '.join(ARCHIVE_SUFFIXES)}).")


def check_subject(args: argparse.Namespace, given: Given) -> None:
    if getattr(args, "class_data_dir", None) and Path(args.class_data_dir).is_file():
        check_data_dir("--class_data_dir", args.class_data_dir)   # a file must be an archive
    sources = [f for f in ("mask_data_dir", "alpha_mask", "mask_model") if getattr(args, f)]
    users = [f for f in ("masked_loss", "crop_to_mask") if getattr(args, f)]
    if users and not sources:
        raise CliError(f"--{users[0]} needs masks: give --mask_data_dir, --alpha_mask or --mask_model.")
    if sources and not users:
        raise CliError(f"--{sources[0]} has no effect without --masked_loss or --crop_to_mask.")
    if args.mask_model and not args.mask_target_prompts:
        raise CliError("--mask_model needs --mask_target_prompts, e.g. --mask_target_prompts 'a face'.")
    if args.mask_target_prompts and not args.mask_model:
        raise CliError("--mask_target_prompts needs --mask_model.")
    if args.caption_prefix is not None and not args.caption_model:
        raise CliError("--caption_prefix is put in front of generated captions; it needs --caption_model.")
    if args.mask_data_dir and not Path(args.mask_data_dir).is_dir():
        raise CliError(f"--mask_data_dir '{args.mask_data_dir}' is not a folder.")
    for flag in ("caption_model", "upscale_model", "mask_model"):
        value = getattr(args, flag)
        if value and _looks_local(value) and not Path(value).exists():
            raise CliError(f"--{flag} '{value}' does not exist.")


def check_prediction_type(args: argparse.Namespace, given: Given, *, allowed: Sequence[str]) -> None:
    """`allowed`: the prediction types of the script (bound with functools.partial in its check list)."""
    if args.prediction_type is not None and args.prediction_type not in allowed:
        raise CliError(f"--prediction_type '{args.prediction_type}' is not supported; "
                       f"choose one of: {', '.join(allowed)}.")
    if args.clip_skip is not None and not 1 <= args.clip_skip <= 12:
        raise CliError(f"--clip_skip counts CLIP layers from the end (1 = the last, 2 = the penultimate), from 1 to "
                       f"12; got {args.clip_skip}.")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        raise CliError(f"--snr_gamma must be positive, got {args.snr_gamma}.")
    message = check_zero_terminal_snr(args.prediction_type or base_prediction_type(args.pretrained_model_name_or_path,
                                                                                   args.single_file_config),
                                      args.zero_terminal_snr or base_has_ztsnr(args.pretrained_model_name_or_path),
                                      "--zero_terminal_snr" if args.zero_terminal_snr else "the base model's")
    if message:
        raise CliError(message)
    if getattr(args, "dream_training", False) and args.prediction_type not in (None, "epsilon"):
        raise CliError("--dream_training supports epsilon prediction only, not "
                       f"--prediction_type={args.prediction_type}.")
    if getattr(args, "input_perturbation", 0) < 0:
        raise CliError("--input_perturbation cannot be negative.")


# Flags that only mean something with --use_lora (a script that lacks one is never given it).
LORA_ONLY = ("rank", "output_kohya_format", "lora_dropout", "lora_layers", "lora_blocks", "upcast_before_saving",
             "lora_alpha", "lora_type", "use_dora", "conv_rank", "conv_alpha", "lokr_factor", "rank_dropout",
             "module_dropout", "lora_targets", "lora_target_regex", "init_lora",
             "loraplus_lr_ratio", "network_args")


def check_lora(args: argparse.Namespace, given: Given) -> None:
    if not args.use_lora:
        typed = [name for name in LORA_ONLY if name in given]
        if typed:
            flags = ", ".join(f"--{n}" for n in typed)
            raise CliError(f"{flags} only applies to LoRA training; add --use_lora.")
        return
    if args.rank < 1:
        raise CliError(f"--rank must be at least 1, got {args.rank}.")
    check_adapter(args, given)


def check_adapter_numbers(args: argparse.Namespace) -> None:
    for name in ("lora_alpha", "conv_alpha"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise CliError(f"--{name} must be positive, got {getattr(args, name)}.")
    if args.conv_rank is not None and args.conv_rank < 1:
        raise CliError(f"--conv_rank must be at least 1, got {args.conv_rank}.")
    for name in ("lora_dropout", "rank_dropout", "module_dropout"):
        if not 0 <= getattr(args, name) < 1:
            raise CliError(f"--{name} must be at least 0 and below 1, got {getattr(args, name)}.")


def check_adapter(args: argparse.Namespace, given: Given) -> None:
    """The adapter options of sdft.adapters: each only with the types that have it."""
    check_adapter_numbers(args)
    lycoris = args.lora_type in ("loha", "lokr")
    if args.use_dora and lycoris:
        raise CliError(f"--use_dora applies to --lora_type lora or locon, not {args.lora_type}.")
    wrong = [f"--{name}" for name, ok in (("rank_dropout", lycoris), ("module_dropout", lycoris),
                                          ("lora_dropout", not lycoris), ("lokr_factor", args.lora_type == "lokr"))
             if name in given and not ok]
    if wrong:
        raise CliError(f"{', '.join(wrong)} does not apply to --lora_type {args.lora_type} (rank and module dropout: "
                       "loha/lokr; --lora_dropout: lora/locon; --lokr_factor: lokr).")
    if args.lokr_factor == 0 or args.lokr_factor < -1:
        raise CliError(f"--lokr_factor must be -1 or a positive number, got {args.lokr_factor}.")
    if args.lora_type == "locon" and "lora_targets" in given and args.lora_targets != "full":
        raise CliError(f"--lora_type locon adapts the 3x3 convolutions, which --lora_targets {args.lora_targets} "
                       "leaves out; use --lora_targets full (the default for locon) or --lora_type lora.")
    if args.loraplus_lr_ratio is not None and (args.loraplus_lr_ratio <= 0 or args.lora_type in ("loha", "lokr")):
        raise CliError(f"--loraplus_lr_ratio must be positive and applies to --lora_type lora or locon (its up "
                       f"matrices), got {args.loraplus_lr_ratio} with --lora_type {args.lora_type}.")
    if args.init_lora is not None and not Path(args.init_lora).exists():
        raise CliError(f"--init_lora '{args.init_lora}' does not exist.")
    if args.lora_target_regex is not None:
        try:
            re.compile(args.lora_target_regex)
        except re.error as err:
            raise CliError(f"--lora_target_regex '{args.lora_target_regex}' is not a regular expression: {err}.") from err


def check_network_args(args: argparse.Namespace, given: Given, *, family: str) -> None:
    """--network_args (sdft.adapter_blocks): keys, value counts for the family, numbers and regexes."""
    if not args.use_lora or not args.network_args:
        return
    settings = parse_network_args(args.network_args, family)     # NetworkArgsError is a CliError
    convs = args.lora_type == "locon" or args.lora_targets == "full" or args.lora_target_regex is not None
    if settings.conv_block_dims is not None and not convs:
        raise CliError("--network_args conv_block_dims ranks the 3x3 convolutions, which this run does not adapt; "
                       "add --lora_type locon or --lora_targets full.")


def check_single_file(args: argparse.Namespace, given: Given) -> None:
    if not args.save_single_file:
        if args.save_precision is not None:
            raise CliError("--save_precision sets the precision of the --save_single_file checkpoint; "
                           "add --save_single_file.")
        return
    if args.use_lora:
        raise CliError("--save_single_file writes a full model checkpoint and cannot be combined with --use_lora; "
                       "the LoRA file is what UIs load (see --output_kohya_format).")


def check_ema(args: argparse.Namespace, given: Given) -> None:
    if not 0 < args.ema_decay < 1:
        raise CliError(f"--ema_decay must be between 0 and 1 (exclusive), got {args.ema_decay}.")
    if not args.use_ema:
        for name in ("offload_ema", "foreach_ema", "ema_decay"):
            if name in given:
                print(f"warning: --{name} has no effect without --use_ema", file=sys.stderr)


def check_resume(args: argparse.Namespace, given: Given) -> None:
    """An explicit checkpoint must exist now, not after the models are loaded."""
    try:
        resolve_resume(args.resume_from_checkpoint, args.output_dir)
    except FileNotFoundError as err:
        raise CliError(str(err)) from err


def check_validation(args: argparse.Namespace, given: Given, *, flow: bool = False) -> None:
    """Sample sets: cadence flags, the sampler, and every line of --sample_prompts (SD3: `flow`,
    sizes in multiples of 16), before any model loads."""
    if args.num_validation_images < 0:
        raise CliError("--num_validation_images cannot be negative.")
    for name in ("validation_steps", "sample_every_n_steps", "sample_every_n_epochs", "ddp_timeout"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CliError(f"--{name} must be at least 1, got {value}.")
    if args.validation_steps and args.sample_every_n_steps and args.validation_steps != args.sample_every_n_steps:
        raise CliError("--validation_steps and --sample_every_n_steps are one setting; give one of them.")
    if "validation_epochs" in given and (args.validation_steps or args.sample_every_n_steps) \
            and args.sample_every_n_epochs is None:
        raise CliError("--validation_epochs does not apply with a step cadence (--sample_every_n_steps/"
                       "--validation_steps); use --sample_every_n_epochs to sample by epochs as well.")
    if args.sample_sampler is not None:
        try:
            package = samplers.missing_package(args.sample_sampler, flow)
        except ValueError as err:
            raise CliError(f"--sample_sampler: {err}.") from None
        if package:
            raise CliError(f"--sample_sampler {args.sample_sampler} needs {package}: pip install {package}.")
    if args.sample_prompts is not None:
        sample_prompts.load(args.sample_prompts, multiple=SD3_LATENT_MULTIPLE if flow else LATENT_MULTIPLE, flow=flow)


def check_tracking_and_hub(args: argparse.Namespace, given: Given) -> None:
    trackers = [t.strip() for t in args.report_to.split(",")]
    if ("wandb" in trackers or "all" in trackers) and args.hub_token is not None:
        raise CliError("--report_to=wandb with --hub_token would expose the token in the wandb run config; "
                       "log in with `hf auth login` instead of passing --hub_token.")
    for tracker in trackers:
        if tracker not in TRACKERS:
            raise CliError(f"--report_to '{tracker}' is unknown; choose from: {', '.join(TRACKERS)}.")
        if tracker in ("wandb", "comet_ml", "tensorboard") and importlib.util.find_spec(tracker) is None:
            raise CliError(f"--report_to={tracker} needs the '{tracker}' package: pip install {tracker}.")


def check_sdxl(args: argparse.Namespace, given: Given) -> None:
    for number in (1, 2):
        value = getattr(args, f"learning_rate_te{number}")
        if value is not None and not args.train_text_encoder:
            raise CliError(f"--learning_rate_te{number} sets a text encoder's learning rate; add --train_text_encoder.")
        if value is not None and value < 0:
            raise CliError(f"--learning_rate_te{number} cannot be negative, got {value}.")
    if args.learning_rate_te1 == 0 and args.learning_rate_te2 == 0:
        raise CliError("--learning_rate_te1 0 and --learning_rate_te2 0 freeze both text encoders; drop "
                       "--train_text_encoder instead.")
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise CliError(f"--proportion_empty_prompts must be between 0 and 1, got {args.proportion_empty_prompts}.")
    if args.timestep_bias_strategy != "none" or "timestep_bias_multiplier" in given:
        try:
            validate_timestep_bias(args.timestep_bias_strategy, args.timestep_bias_multiplier,
                                   args.timestep_bias_begin, args.timestep_bias_end, args.timestep_bias_portion)
        except ValueError as err:
            raise CliError(str(err)) from err


def check_dreambooth(args: argparse.Namespace, given: Given) -> None:
    if args.dataset_config is None and (args.dataset_name is None) == (args.instance_data_dir is None):
        raise CliError("Give exactly one of --instance_data_dir (a folder of images) and --dataset_name.")
    check_data_dir("--instance_data_dir", args.instance_data_dir)
    if args.with_prior_preservation:
        if args.class_data_dir is None or args.class_prompt is None:
            raise CliError("--with_prior_preservation needs --class_data_dir and --class_prompt.")
    elif args.class_data_dir is not None or args.class_prompt is not None:
        print("warning: --class_data_dir/--class_prompt have no effect without --with_prior_preservation",
              file=sys.stderr)
    for name in ("repeats", "num_class_images", "sample_batch_size"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.prior_loss_weight < 0:
        raise CliError(f"--prior_loss_weight cannot be negative, got {args.prior_loss_weight}.")


DREAMBOOTH_ONLY = ("instance_prompt", "with_prior_preservation", "class_data_dir", "class_prompt", "num_class_images",
                   "repeats", "prior_loss_weight", "sample_batch_size", "prior_generation_precision")
TEXTUAL_INVERSION_ONLY = ("token_abstraction", "num_new_tokens_per_abstraction", "train_text_encoder_ti_frac",
                          "initializer_concept")


def check_t2i_or_dreambooth_data(args: argparse.Namespace, given: Given) -> None:
    """SD 1.x / SDXL: captioned images (--train_data_dir/--dataset_name) or DreamBooth data (or a
    --dataset_config, checked by check_dataset_config)."""
    if args.dataset_config is not None:
        return
    if args.instance_data_dir is None:
        # --prior_loss_weight also weighs kohya regularisation folders (--reg_data_dir).
        typed = [f"--{name}" for name in DREAMBOOTH_ONLY if name in given
                 and not (name == "prior_loss_weight" and args.reg_data_dir is not None)]
        if typed:
            raise CliError(f"{', '.join(typed)} only applies to DreamBooth data; add --instance_data_dir.")
        check_t2i_dataset(args)
        return
    if args.train_data_dir is not None or args.dataset_name is not None:
        raise CliError("--instance_data_dir (DreamBooth data) replaces --train_data_dir and --dataset_name; give one.")
    if args.instance_prompt is None:
        raise CliError("--instance_data_dir needs --instance_prompt, the caption of every instance image.")
    check_dreambooth(args, given)


def check_textual_inversion(args: argparse.Namespace, given: Given) -> None:
    if not args.train_text_encoder_ti:
        typed = [f"--{name}" for name in TEXTUAL_INVERSION_ONLY if name in given]
        if typed:
            raise CliError(f"{', '.join(typed)} only applies with --train_text_encoder_ti.")
        if not args.train_unet:
            raise CliError("--train_unet false leaves nothing to train; add --train_text_encoder_ti.")
        return
    plan = TokenPlan.from_flags(args.token_abstraction, max(1, args.num_new_tokens_per_abstraction))
    if getattr(args, "instance_data_dir", None) is not None:
        # DreamBooth folder data is captioned by the prompts, so the check needs no data yet.
        prompts = [args.instance_prompt, args.class_prompt if args.with_prior_preservation else None,
                   args.validation_prompt, *(getattr(args, "validation_prompts", None) or [])]
        check_abstractions_used(plan, [prompt for prompt in prompts if prompt])
    if getattr(args, "train_text_encoder", False):
        # As diffusers' advanced script: the text encoders are either LoRA-trained or given new tokens.
        raise CliError("--train_text_encoder_ti cannot be combined with --train_text_encoder; choose one.")
    if args.num_new_tokens_per_abstraction < 1:
        raise CliError("--num_new_tokens_per_abstraction must be at least 1, "
                       f"got {args.num_new_tokens_per_abstraction}.")
    if not 0 < args.train_text_encoder_ti_frac <= 1:
        raise CliError(f"--train_text_encoder_ti_frac must be in (0, 1], got {args.train_text_encoder_ti_frac}.")
    if not args.train_unet:
        for name in ("use_lora", "use_ema"):
            if getattr(args, name, False):
                raise CliError(f"--{name} trains the UNet, which --train_unet false freezes.")
        if "train_text_encoder_ti_frac" in given and args.train_text_encoder_ti_frac < 1:
            print("warning: --train_text_encoder_ti_frac is ignored with --train_unet false: the embeddings are "
                  "all there is to train, so they train for every step", file=sys.stderr)


def check_sd3_text_lengths(max_sequence_length: int, max_token_length: int | None) -> None:
    if not 1 <= max_sequence_length <= 512:
        raise CliError(f"--max_sequence_length must be between 1 and 512 (T5's limit), got {max_sequence_length}.")
    if max_token_length is not None:
        raise CliError(SD3_LONG_PROMPTS)


def check_sd3(args: argparse.Namespace, given: Given) -> None:
    if args.dataset_config is not None:
        read_config(args, SD3_LATENT_MULTIPLE)
    if args.enable_bucket and args.bucket_reso_steps % SD3_LATENT_MULTIPLE:
        # VAE 8 x transformer patch 2.
        raise CliError(f"--bucket_reso_steps must be a positive multiple of {SD3_LATENT_MULTIPLE}, "
                       f"got {args.bucket_reso_steps}.")
    check_sd3_text_lengths(args.max_sequence_length, args.max_token_length)
    if args.precondition_outputs not in (0, 1):
        raise CliError(f"--precondition_outputs must be 0 or 1, got {args.precondition_outputs}.")
    if args.text_encoder_lr <= 0:
        raise CliError(f"--text_encoder_lr must be positive, got {args.text_encoder_lr}.")
    if args.lora_blocks:
        try:
            [int(block) for block in args.lora_blocks.split(",")]
        except ValueError as err:
            raise CliError(f"--lora_blocks must be comma-separated block numbers, got '{args.lora_blocks}'.") from err
    check_validation(args, given, flow=True)   # flow-matching samplers, sizes in multiples of 16
    if args.sample_slg is not None:
        try:
            layers = [int(layer) for layer in args.sample_slg.split(",")]
        except ValueError:
            raise CliError(f"--sample_slg must be comma-separated block numbers, got '{args.sample_slg}'.") from None
        if min(layers) < 0:
            raise CliError(f"--sample_slg block numbers cannot be negative, got '{args.sample_slg}'.")


@contextmanager
def _flag_errors():
    """The objectives' validate_* functions raise ValueError naming the flag; here it is a CliError."""
    try:
        yield
    except ValueError as err:
        raise CliError(f"{err}.") from err


HUBER_ONLY = ("huber_schedule", "huber_c", "huber_scale")


def check_loss_type(args: argparse.Namespace, given: Given) -> None:
    with _flag_errors():
        validate_loss_type(args.loss_type, args.huber_schedule, args.huber_c, args.huber_scale)
    typed = [f"--{name}" for name in HUBER_ONLY if name in given]
    if typed and args.loss_type not in ("huber", "smooth_l1"):
        # kohya ignores them silently; recipes often carry them along with --loss_type l2.
        print(f"warning: {', '.join(typed)} has no effect with --loss_type {args.loss_type} "
              "(only with huber or smooth_l1)", file=sys.stderr)


def input_perturbation_gamma(args: argparse.Namespace, given: Given) -> float:
    """--ip_noise_gamma (kohya) and --input_perturbation (diffusers, SD 1.x script) are one knob."""
    if args.ip_noise_gamma is None:
        return args.input_perturbation
    if "input_perturbation" in given and args.input_perturbation != args.ip_noise_gamma:
        raise CliError(f"--ip_noise_gamma {args.ip_noise_gamma} and --input_perturbation {args.input_perturbation} "
                       "are the same setting; give one.")
    return args.ip_noise_gamma


def check_ddpm_recipes(args: argparse.Namespace, given: Given) -> None:
    """kohya's noise and timestep knobs (issue 21), and how they meet the timestep bias."""
    with _flag_errors():
        validate_timestep_window(args.min_timestep, args.max_timestep)
        validate_noise_offset(args.noise_offset, args.noise_offset_random_strength, args.adaptive_noise_scale)
        validate_multires_noise(args.multires_noise_iterations or 0, args.multires_noise_discount)
        validate_input_perturbation(input_perturbation_gamma(args, given), args.ip_noise_gamma_random_strength)
    if "multires_noise_discount" in given and not args.multires_noise_iterations:
        print("warning: --multires_noise_discount has no effect without --multires_noise_iterations", file=sys.stderr)
    check_bias_in_window(args)


def check_bias_in_window(args: argparse.Namespace) -> None:
    """A 'range' timestep bias entirely outside --min_timestep/--max_timestep would change nothing
    (the window wins); the earlier/later portions depend on the scheduler and are checked at build time."""
    if args.timestep_bias_strategy != "range" or (args.min_timestep is None and args.max_timestep is None):
        return
    low = args.min_timestep or 0
    high = args.timestep_bias_end if args.max_timestep is None else args.max_timestep
    if max(low, args.timestep_bias_begin) >= min(high, args.timestep_bias_end):
        raise CliError(f"--timestep_bias_begin/--timestep_bias_end [{args.timestep_bias_begin}, "
                       f"{args.timestep_bias_end}) lies outside --min_timestep/--max_timestep [{low}, "
                       f"{'T' if args.max_timestep is None else high}): the bias would have no effect.")


def check_flow_recipes(args: argparse.Namespace, given: Given) -> None:
    """SD3's timestep shift and sampling (issue 21)."""
    with _flag_errors():
        validate_flow_shift(args.training_shift, ResolutionShift() if args.resolution_dependent_shift else None,
                            args.timestep_sampling)
        validate_pos_emb_random_crop_rate(args.pos_emb_random_crop_rate)
    if args.timestep_sampling == "uniform":
        typed = [f"--{name}" for name in ("logit_mean", "logit_std", "mode_scale") if name in given]
        if typed:
            print(f"warning: {', '.join(typed)} shape the timestep density, which --timestep_sampling uniform "
                  "does not use", file=sys.stderr)


def check_optimizer(args: argparse.Namespace, given: Given) -> None:
    """The optimizer exists (its package installed), its --optimizer_args are arguments it takes,
    and the older flags agree with --optimizer_type; all before any model loads."""
    if args.optimizer.lower() not in OPTIMIZERS:
        raise CliError(f"--optimizer '{args.optimizer}' is not supported; use AdamW, prodigy or adafactor "
                       "(or --optimizer_type for more).")
    try:
        name = chosen_name(args.optimizer_type, args.optimizer, args.use_8bit_adam)
        cls = optimizer_class(name)
        check_optimizer_args(cls, name, parse_optimizer_args(args.optimizer_args))
        check_schedule(cls, name, args.lr_scheduler)
    except OptimizerError as err:
        raise CliError(str(err)) from err
    unused = unused_adam_flags(name, set(given)) + [flag for flag in PRODIGY_FLAGS if flag in given and name != "prodigy"]
    if unused:
        example = ADAM_FLAGS.get(unused[0], unused[0].removeprefix("prodigy_"))
        raise CliError(f"--{unused[0]} does not configure {optimizer_flag(args)}; pass its arguments with "
                       f"--optimizer_args (e.g. {example}=...).")


PRODIGY_FLAGS = ("prodigy_beta3", "prodigy_decouple", "prodigy_use_bias_correction", "prodigy_safeguard_warmup")


def optimizer_flag(args: argparse.Namespace) -> str:
    """How the command line chose the optimizer, for messages."""
    if args.optimizer_type is not None:
        return f"--optimizer_type {args.optimizer_type}"
    return "--use_8bit_adam" if args.use_8bit_adam and args.optimizer.lower() == "adamw" else f"--optimizer {args.optimizer}"


def check_memory_flags(args: argparse.Namespace, given: Given) -> None:
    """The combinations the accelerator does not decide (the process count and an fp16/no mixed
    precision set in `accelerate config` are checked when the accelerator exists)."""
    one_at_a_time = [f"--{flag}" for flag in ("fused_backward_pass", "full_bf16") if getattr(args, flag)]
    if one_at_a_time and not per_parameter(chosen_name(args.optimizer_type, args.optimizer, args.use_8bit_adam)):
        raise CliError(f"{one_at_a_time[0]} applies the optimizer one tensor at a time, which {optimizer_flag(args)} "
                       "cannot do (its step depends on all parameters at once, like Prodigy's step size or a "
                       "schedule-free average); use AdamW, AdamW8bit, Lion, Adafactor, CAME or SGDNesterov.")
    if args.fused_backward_pass:
        if "max_grad_norm" in given:
            raise CliError("--max_grad_norm needs every gradient at once, which --fused_backward_pass never holds; "
                           "drop --max_grad_norm (clipping is off with --fused_backward_pass).")
        if getattr(args, "train_text_encoder_ti", False):
            raise CliError("--fused_backward_pass cannot be used with --train_text_encoder_ti, whose new-token "
                           "gradients are masked after the backward pass; drop one of them.")
        if args.mixed_precision == "fp16":
            raise CliError("--fused_backward_pass cannot be used with --mixed_precision fp16 (the gradient scaler "
                           "checks all gradients before a step); use --mixed_precision bf16.")
    if args.blocks_to_swap is not None:
        check_block_swap(args)
    if "compile_mode" in given and not args.torch_compile:
        raise CliError("--compile_mode is the mode of --torch_compile; add --torch_compile.")
    if args.full_bf16:
        if args.use_lora:
            raise CliError("--full_bf16 is for full fine-tuning; LoRA weights are kept in fp32 (drop --full_bf16).")
        if args.mixed_precision in ("no", "fp16"):
            raise CliError(f"--full_bf16 needs --mixed_precision bf16, got --mixed_precision {args.mixed_precision}.")


def check_base_precision(args: argparse.Namespace, given: Given) -> None:
    """--base_precision/--text_encoder_precision (and kohya's --fp8_base/--fp8_base_unet): only
    frozen weights can be quantized (sdft.quantization)."""
    aliases = [f"--{name}" for name in ("fp8_base", "fp8_base_unet") if getattr(args, name)]
    if aliases and args.base_precision not in (None, "fp8"):
        raise CliError(f"{aliases[0]} means --base_precision fp8; it contradicts --base_precision {args.base_precision}.")
    precision = quantization.resolve(args.base_precision, args.text_encoder_precision, args.fp8_base,
                                     args.fp8_base_unet)
    base_flag = f"--base_precision {args.base_precision}" if args.base_precision else next(iter(aliases), None)
    text_flag = (f"--text_encoder_precision {args.text_encoder_precision}" if args.text_encoder_precision
                 else "--fp8_base" if args.fp8_base else None)
    named = " and ".join(dict.fromkeys(flag for flag in (base_flag, text_flag) if flag))
    if not named:
        return
    if args.full_bf16:
        raise CliError(f"{named} cannot be combined with --full_bf16: a quantized base trains adapters, which stay "
                       "fp32, and --full_bf16 is for full fine-tuning; drop one of them.")
    if precision.denoiser and args.train_unet and not args.use_lora:
        raise CliError(f"{base_flag} stores the denoiser quantized, and a quantized weight cannot be trained: this is "
                       "a full fine-tune; add --use_lora to train adapters on it, or drop the flag.")
    if precision.text_encoders and args.train_text_encoder and not args.use_lora:
        raise CliError(f"{text_flag} stores the text encoders quantized, and a quantized weight cannot be trained: "
                       "--train_text_encoder trains them fully here; add --use_lora, or drop one of the flags.")
    quantization.require_library(named)


def check_block_swap(args: argparse.Namespace) -> None:
    if args.blocks_to_swap < 1:
        raise CliError(f"--blocks_to_swap must be at least 1, got {args.blocks_to_swap}.")
    if args.use_ema:
        raise CliError("--blocks_to_swap cannot be used with --use_ema: the EMA copy lives on the accelerator while "
                       "the swapped blocks' weights live in host memory; drop one of them.")
    if args.torch_compile and args.compile_mode in ("reduce-overhead", "max-autotune"):
        raise CliError(f"--compile_mode {args.compile_mode} records CUDA graphs, which need the weights at fixed "
                       "addresses; --blocks_to_swap moves them every step. Use --compile_mode default or "
                       "max-autotune-no-cudagraphs.")


def check_text_encoder_frac(args: argparse.Namespace, given: Given) -> None:
    if "train_text_encoder_frac" in given and not args.train_text_encoder:
        raise CliError("--train_text_encoder_frac is the fraction of steps the text encoders train; add "
                       "--train_text_encoder.")
    if not 0 < args.train_text_encoder_frac <= 1:
        raise CliError(f"--train_text_encoder_frac must be above 0 and at most 1, got {args.train_text_encoder_frac}.")


def check_caches(args: argparse.Namespace, given: Given) -> None:
    """Text outputs can only be cached for frozen encoders; a disk cache folder must be writable."""
    text = args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk
    for trains in ("train_text_encoder", "train_text_encoder_ti"):
        if text and getattr(args, trains, False):
            raise CliError(f"--cache_text_encoder_outputs needs frozen text encoders; drop --{trains}.")
    if args.cache_latents_to_disk or args.cache_text_encoder_outputs_to_disk:
        try:
            prepare_folder(cache_folder(args.latents_cache_dir, args.output_dir), "--latents_cache_dir")
        except DataError as err:
            raise CliError(str(err)) from err


def check_accelerators(args: argparse.Namespace, given: Given) -> None:
    if getattr(args, "enable_npu_flash_attention", False) and importlib.util.find_spec("torch_npu") is None:
        raise CliError("--enable_npu_flash_attention needs an Ascend NPU and torch_npu.")
    if getattr(args, "enable_xformers_memory_efficient_attention", False):
        if importlib.util.find_spec("xformers") is None:
            raise CliError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers. "
                           "Without the flag PyTorch's SDPA attention is used.")
        if not torch.cuda.is_available():
            raise CliError("--enable_xformers_memory_efficient_attention needs a CUDA GPU.")
    if args.use_8bit_adam and getattr(args, "optimizer", "adamw").lower() != "adamw":
        print("warning: --use_8bit_adam applies to AdamW only and is ignored with --optimizer="
              f"{args.optimizer}", file=sys.stderr)
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise CliError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes.")


def check_sharding(args: argparse.Namespace, given: Given) -> None:
    """FSDP2 / DeepSpeed come from the accelerate config (its environment); what they cannot do is
    refused here, naming the flags, before any model loads."""
    try:
        config = EngineConfig.from_environ()
    except ValueError as err:
        raise CliError(f"accelerate config: {err}") from err
    shape = RunShape(lora=args.use_lora, ema=args.use_ema, fused_backward=args.fused_backward_pass,
                     text_encoders=args.train_text_encoder or args.train_text_encoder_ti,
                     single_file=args.save_single_file,
                     held_out_loss=bool(args.validation_split or args.validation_data_dir))
    problems = refusals(config, shape)
    if problems:
        raise CliError(f"{config.describe()} (from the accelerate config) cannot run this: " + "; ".join(problems) + ".")
    if config.engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise CliError("The accelerate config asks for DeepSpeed, which is not installed: pip install deepspeed==0.19.8")


def check_buckets(args: argparse.Namespace, given: Given) -> None:
    if not args.enable_bucket:
        typed = [f"--{name}" for name in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                                          "bucket_no_upscale") if name in given]
        if typed:
            print(f"warning: {', '.join(typed)} has no effect without --enable_bucket", file=sys.stderr)
        return
    step, multiple = args.bucket_reso_steps, LATENT_MULTIPLE
    if step < multiple or step % multiple:
        raise CliError(f"--bucket_reso_steps must be a positive multiple of {multiple}, got {step}.")
    for name in ("min_bucket_reso", "max_bucket_reso"):
        if getattr(args, name) < step or getattr(args, name) % step:
            raise CliError(f"--{name} must be a multiple of --bucket_reso_steps {step}, got {getattr(args, name)}.")
    if args.min_bucket_reso > args.max_bucket_reso:
        raise CliError(f"--min_bucket_reso {args.min_bucket_reso} is larger than --max_bucket_reso "
                       f"{args.max_bucket_reso}.")
    if not bucket_sizes(BucketSettings(args.resolution, args.min_bucket_reso, args.max_bucket_reso, step)):
        raise CliError(f"No bucket of about --resolution {args.resolution} squared pixels has both sides between "
                       f"--min_bucket_reso {args.min_bucket_reso} and --max_bucket_reso {args.max_bucket_reso}.")
    if getattr(args, "cache_latents", False) and getattr(args, "with_prior_preservation", False):
        raise CliError("--enable_bucket with --cache_latents does not support --with_prior_preservation yet "
                       "(a class image takes the bucket of each instance image it is paired with).")


def check_validation_loss(args: argparse.Namespace, given: Given) -> None:
    if not 0 <= args.validation_split < 1:
        raise CliError(f"--validation_split must be at least 0 and below 1, got {args.validation_split}.")
    if args.validation_split and args.validation_data_dir is not None:
        raise CliError("Give --validation_split or --validation_data_dir, not both.")
    if args.validation_data_dir is not None and not Path(args.validation_data_dir).is_dir():
        raise CliError(f"--validation_data_dir '{args.validation_data_dir}' is not a folder.")
    enabled = bool(args.validation_split) or args.validation_data_dir is not None
    for name in ("validate_every_n_steps", "validation_seed"):
        if name in given and not enabled:
            raise CliError(f"--{name} needs held-out images: add --validation_split or --validation_data_dir.")
    if args.validate_every_n_steps is not None and args.validate_every_n_steps < 1:
        raise CliError(f"--validate_every_n_steps must be at least 1, got {args.validate_every_n_steps}.")
    if args.validation_seed is not None and not 0 <= args.validation_seed < 2**32:
        raise CliError(f"--validation_seed must be between 0 and 2**32 - 1, got {args.validation_seed}.")


def check_dataset_config(args: argparse.Namespace, given: Given) -> None:
    """kohya's caption flags, and a --dataset_config read in full (every error names the file,
    table and key) before any model loads."""
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0 <= getattr(args, name) <= 1:
            raise CliError(f"--{name} must be between 0 and 1, got {getattr(args, name)}.")
    for name in ("keep_tokens", "caption_dropout_every_n_epochs"):
        if getattr(args, name) < 0:
            raise CliError(f"--{name} cannot be negative, got {getattr(args, name)}.")
    if not args.caption_separator:
        raise CliError("--caption_separator cannot be empty.")
    if args.reg_data_dir is not None and not Path(args.reg_data_dir).is_dir():
        raise CliError(f"--reg_data_dir '{args.reg_data_dir}' is not a folder.")
    if args.reg_data_dir is not None and getattr(args, "train_data_dir", None) is None:
        raise CliError("--reg_data_dir needs --train_data_dir holding kohya N_name folders (with --dataset_config, "
                       "use an is_reg subset).")
    if args.dataset_config is None:
        return
    typed = [f"--{name}" for name in ("train_data_dir", "dataset_name", "instance_data_dir")
             if getattr(args, name, None) is not None]
    if typed:
        raise CliError(f"--dataset_config replaces {', '.join(typed)}: the config names the image folders; give one.")
    conflicts = subset_conflicts(args)
    if conflicts:
        raise CliError(f"--dataset_config does not combine with {', '.join(conflicts)} yet.")
    read_config(args, LATENT_MULTIPLE)


def read_config(args: argparse.Namespace, step_multiple: int) -> None:
    try:
        read_dataset_config(args.dataset_config, dataset_config_defaults(args), step_multiple=step_multiple)
    except DataError as err:
        raise CliError(str(err)) from err


# Run by every script, before its own checks.
COMMON = [check_positive, check_model_path, check_lora, check_textual_inversion, check_ema, check_resume,
          check_validation, check_tracking_and_hub, check_accelerators, check_single_file, check_buckets,
          check_validation_loss, check_subject, check_optimizer, check_base_precision, check_memory_flags,
          check_text_encoder_frac, check_caches, check_output_dir, check_loss_type, check_dataset_config,
          check_sharding]
