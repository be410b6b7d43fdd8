"""Flags into objects: the data, objective and optimizer each script asks for.

This is the part of the trainer's top layer that reads the argparse namespace; everything it
builds takes plain, typed parameters. A script picks its builders visibly, e.g.
`train(args, family, make_objective=flow_objective, make_data=dreambooth_data)`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from accelerate import Accelerator

from sdft.cli import CliError, cache_folder
from sdft.data.archives import data_folder
from sdft.data.caches import CacheSettings
from sdft.data.buckets import BucketPlan, BucketSettings, captioned_image_sizes, log_plan
from sdft.data.dataset import CaptionedImageDataset
from sdft.data.preprocess.subject import CACHE_FOLDER, SubjectPlan, prepare_subject
from sdft.data.dreambooth import (DreamBoothDataset, generate_class_images, load_class_images, load_instance_images,
                                  missing_class_images)
from sdft.data.held_out import split_held_out
from sdft.data.sources import CaptionedImages, load_captioned_images
from sdft.data.transforms import ImageTransform
from sdft.families.source import ModelSource
from sdft.objectives import DDPMObjective, FlowMatchingObjective, flow_sigma_table, timestep_bias_weights
from sdft import memory_estimate
from sdft.optim import (AdafactorSettings, AdamSettings, ProdigySettings, build_adafactor, build_adamw, build_prodigy,
                        scaled_lr)
from sdft.stepping import OptimizerStepper, ParamUpdater
from sdft.textual_inversion import TokenEmbeddings, TokenPlan, build_token_embeddings

logger = logging.getLogger("sdft")


def image_transform(args: argparse.Namespace) -> ImageTransform:
    return ImageTransform(args.resolution, args.center_crop, args.random_flip,
                          getattr(args, "image_interpolation_mode", "lanczos"),
                          crop_to_mask=getattr(args, "crop_to_mask", False))


def cache_root(args: argparse.Namespace) -> Path:
    """Extracted archives and upscaled images live here, reused by later runs into the same folder."""
    return Path(args.output_dir) / CACHE_FOLDER


def subject_plan(args: argparse.Namespace, root: Path | None) -> SubjectPlan:
    return SubjectPlan(
        resolution=args.resolution, output_dir=Path(args.output_dir), root=root, model_cache_dir=args.cache_dir,
        caption_model=getattr(args, "caption_model", None), caption_prefix=getattr(args, "caption_prefix", "") or "",
        upscale_model=getattr(args, "upscale_model", None), mask_data_dir=getattr(args, "mask_data_dir", None),
        alpha_mask=getattr(args, "alpha_mask", False), mask_model=getattr(args, "mask_model", None),
        mask_target_prompts=tuple(getattr(args, "mask_target_prompts", None) or ()),
        need_masks=getattr(args, "masked_loss", False) or getattr(args, "crop_to_mask", False),
    )


def bucket_settings(args: argparse.Namespace) -> BucketSettings | None:
    if not getattr(args, "enable_bucket", False):
        return None
    return BucketSettings(args.resolution, args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps,
                          args.bucket_no_upscale)


def bucket_plan(args: argparse.Namespace, images: CaptionedImages, what: str = "training") -> BucketPlan | None:
    """The buckets of `images` under --enable_bucket (None without), logged as a table."""
    settings = bucket_settings(args)
    if settings is None:
        return None
    plan = BucketPlan.build(captioned_image_sizes(images), settings)
    log_plan(plan, images.name, settings, what)
    return plan


def validation_seed(args: argparse.Namespace, seed: int) -> int:
    chosen = getattr(args, "validation_seed", None)
    return seed if chosen is None else chosen


def text_image_data(args: argparse.Namespace, seed: int, accelerator: Accelerator, family) -> CaptionedImageDataset:
    data_dir, _ = data_folder(args.train_data_dir, cache_root(args), accelerator)
    images = load_captioned_images(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
        train_data_dir=data_dir, image_column=args.image_column, caption_column=args.caption_column,
        cache_dir=args.cache_dir, max_train_samples=args.max_train_samples, seed=seed,
        allow_missing_captions=getattr(args, "caption_model", None) is not None,
    )
    root = Path(data_dir) if data_dir is not None and args.dataset_name is None else None
    images = prepare_subject(images, subject_plan(args, root), accelerator)
    images, held_out = split_held_out(images, getattr(args, "validation_split", 0.0), validation_seed(args, seed))
    if getattr(args, "validation_data_dir", None) is not None:
        held_out = load_captioned_images(
            dataset_name=None, dataset_config_name=None, train_data_dir=args.validation_data_dir,
            image_column=args.image_column, caption_column=args.caption_column, cache_dir=args.cache_dir,
            max_train_samples=None, seed=seed)
    dataset = CaptionedImageDataset(images, image_transform(args), seed,
                                    empty_caption_rate=getattr(args, "proportion_empty_prompts", 0.0),
                                    buckets=bucket_plan(args, images))
    if held_out is not None:
        dataset.held_out = CaptionedImageDataset(held_out, image_transform(args), validation_seed(args, seed),
                                                 buckets=bucket_plan(args, held_out, "held-out"))
    return dataset


def dreambooth_data(args: argparse.Namespace, seed: int, accelerator: Accelerator, family) -> DreamBoothDataset:
    instance_dir, from_archive = data_folder(args.instance_data_dir, cache_root(args), accelerator)
    instance = load_instance_images(
        instance_data_dir=instance_dir, dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name, image_column=args.image_column,
        caption_column=args.caption_column, instance_prompt=args.instance_prompt, cache_dir=args.cache_dir,
        recursive=from_archive, auto_caption=getattr(args, "caption_model", None) is not None,
    )
    instance = prepare_subject(instance, subject_plan(args, Path(instance_dir) if instance_dir else None), accelerator)
    class_images = None
    if args.with_prior_preservation:
        class_dir, nested = data_folder(args.class_data_dir, cache_root(args), accelerator)
        missing = missing_class_images(class_dir, args.num_class_images, recursive=nested)
        if missing:
            logger.info("Generating %d class images for '%s'", missing, args.class_prompt)
            generate_class_images(Path(class_dir), args.class_prompt, missing,
                                  ClassImagePipeline(family, args, accelerator.device),
                                  sample_batch_size=args.sample_batch_size, accelerator=accelerator, seed=seed,
                                  start_index=args.num_class_images - missing)
        class_images = load_class_images(class_dir, recursive=nested)[: args.num_class_images]
    instance, held_out = split_held_out(instance, getattr(args, "validation_split", 0.0), validation_seed(args, seed))
    if getattr(args, "validation_data_dir", None) is not None:
        held_out = load_instance_images(
            instance_data_dir=args.validation_data_dir, dataset_name=None, dataset_config_name=None,
            image_column=args.image_column, caption_column=None, instance_prompt=args.instance_prompt,
            cache_dir=args.cache_dir)
    dataset = DreamBoothDataset(instance, image_transform(args), seed, repeats=args.repeats,
                                class_images=class_images, class_prompt=args.class_prompt,
                                buckets=bucket_plan(args, instance))
    if held_out is not None:
        dataset.held_out = DreamBoothDataset(held_out, image_transform(args), validation_seed(args, seed),
                                             buckets=bucket_plan(args, held_out, "held-out"))
    return dataset


class ClassImagePipeline:
    """Builds the base pipeline for class-image generation only when images are missing."""

    def __init__(self, family, args: argparse.Namespace, device: torch.device):
        self.family, self.args, self.device = family, args, device

    def __call__(self):
        precision = self.args.prior_generation_precision
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "no": torch.float32}.get(
            precision, torch.float16 if self.device.type in ("cuda", "mps") else torch.float32)
        pipeline = self.family.pipeline_cls.from_pretrained(
            self.args.pretrained_model_name_or_path, revision=self.args.revision, variant=self.args.variant,
            dtype=dtype)
        return pipeline.to(self.device)


def token_plan(args: argparse.Namespace) -> TokenPlan | None:
    if not getattr(args, "train_text_encoder_ti", False):
        return None
    return TokenPlan.from_flags(args.token_abstraction, args.num_new_tokens_per_abstraction)


def token_embeddings(args: argparse.Namespace, family, models, seed: int) -> TokenEmbeddings | None:
    """The new tokens of --train_text_encoder_ti, added to the loaded tokenizers and encoders."""
    plan = token_plan(args)
    if plan is None:
        return None
    return build_token_embeddings(family, models, plan, seed=seed, initializer_concept=args.initializer_concept)


def cache_settings(args: argparse.Namespace) -> CacheSettings:
    latents_to_disk = getattr(args, "cache_latents_to_disk", False)
    text_to_disk = getattr(args, "cache_text_encoder_outputs_to_disk", False)
    return CacheSettings(
        latents=getattr(args, "cache_latents", False) or latents_to_disk, latents_to_disk=latents_to_disk,
        text=getattr(args, "cache_text_encoder_outputs", False) or text_to_disk, text_to_disk=text_to_disk,
        folder=cache_folder(args) if latents_to_disk or text_to_disk else None)


def ddpm_objective(args: argparse.Namespace, noise_scheduler, device: torch.device) -> DDPMObjective:
    prediction_type = args.prediction_type or noise_scheduler.config.prediction_type
    if getattr(args, "dream_training", False) and prediction_type != "epsilon":
        raise CliError(f"--dream_training supports epsilon prediction only; this model predicts {prediction_type}.")
    weights = None
    if getattr(args, "timestep_bias_strategy", "none") != "none":
        try:  # the checks that need the schedule's length (the others ran at parse time)
            weights = timestep_bias_weights(
                args.timestep_bias_strategy, noise_scheduler.config.num_train_timesteps,
                multiplier=args.timestep_bias_multiplier, begin=args.timestep_bias_begin,
                end=args.timestep_bias_end, portion=args.timestep_bias_portion,
            ).to(device)
        except ValueError as err:
            raise CliError(str(err)) from err
    return DDPMObjective(
        alphas_cumprod=noise_scheduler.alphas_cumprod.to(device=device, dtype=torch.float32),
        prediction_type=prediction_type, snr_gamma=args.snr_gamma, noise_offset=args.noise_offset,
        input_perturbation=getattr(args, "input_perturbation", 0.0), timestep_weights=weights,
    )


def flow_objective(args: argparse.Namespace, noise_scheduler, device: torch.device) -> FlowMatchingObjective:
    sigmas, timesteps = flow_sigma_table(noise_scheduler)
    try:
        return FlowMatchingObjective(
            scheduler_sigmas=sigmas.to(device), scheduler_timesteps=timesteps.to(device),
            weighting_scheme=args.weighting_scheme, logit_mean=args.logit_mean, logit_std=args.logit_std,
            mode_scale=args.mode_scale, precondition_outputs=bool(args.precondition_outputs),
        )
    except ValueError as err:
        raise CliError(str(err)) from err


def build_optimizer(args: argparse.Namespace, groups: list[dict], num_processes: int) -> torch.optim.Optimizer:
    lr = args.learning_rate
    if args.scale_lr:
        lr = scaled_lr(lr, args.gradient_accumulation_steps, args.train_batch_size, num_processes)
    betas = (args.adam_beta1, args.adam_beta2)
    if getattr(args, "optimizer", "adamw").lower() == "prodigy":
        if lr <= 0.1:
            logger.warning("Prodigy usually wants --learning_rate around 1.0, got %g.", lr)
        for group in groups:
            # Prodigy estimates one step size; separate text-encoder rates would fight it.
            group.pop("lr", None)
        return build_prodigy(groups, ProdigySettings(
            lr=lr, betas=betas, beta3=args.prodigy_beta3, weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
            decouple=args.prodigy_decouple, use_bias_correction=args.prodigy_use_bias_correction,
            safeguard_warmup=args.prodigy_safeguard_warmup))
    if getattr(args, "optimizer", "adamw").lower() == "adafactor":
        return build_adafactor(groups, AdafactorSettings(lr=lr, weight_decay=args.adam_weight_decay))
    settings = AdamSettings(lr=lr, betas=betas, weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                            use_8bit=args.use_8bit_adam)
    return build_adamw(groups, settings)


def check_memory(args: argparse.Namespace, family, accelerator: Accelerator) -> None:
    """Before any weight is loaded: the flags the accelerator decides, then the memory estimate
    (printed, and refused when it exceeds the device's memory unless --skip_memory_check)."""
    fused, full_bf16 = getattr(args, "fused_backward_pass", False), getattr(args, "full_bf16", False)
    if fused and accelerator.num_processes > 1:
        # DDP all-reduces gradients in buckets after the hooks would already have applied the local ones.
        raise CliError(f"--fused_backward_pass works with one process only, not {accelerator.num_processes}: the "
                       "updates would use each process's own gradients before they are averaged.")
    if fused and accelerator.mixed_precision == "fp16":
        raise CliError("--fused_backward_pass cannot be used with fp16 mixed precision (set in the accelerate "
                       "config here); use --mixed_precision bf16.")
    if full_bf16 and accelerator.mixed_precision != "bf16":
        raise CliError(f"--full_bf16 needs --mixed_precision bf16; this run's is '{accelerator.mixed_precision}'.")
    try:
        stats = memory_estimate.denoiser_stats(args.pretrained_model_name_or_path, family.denoiser_role,
                                               args.revision, args.cache_dir)
    except (OSError, KeyError, AttributeError, ValueError) as err:  # the model loader reports a bad model better
        logger.warning("No memory estimate: the %s config could not be read (%s).", family.denoiser_role, err)
        return
    try:
        logger.info("%s", memory_estimate.check(stats, memory_setup(args, accelerator.mixed_precision),
                                                family.denoiser_role, accelerator.device,
                                                skip=getattr(args, "skip_memory_check", False)))
    except memory_estimate.DoesNotFit as err:
        raise CliError(str(err)) from err


def memory_setup(args: argparse.Namespace, mixed_precision: str) -> memory_estimate.TrainingSetup:
    return memory_estimate.TrainingSetup(
        lora=args.use_lora, optimizer=getattr(args, "optimizer", "adamw"), use_8bit_adam=args.use_8bit_adam,
        full_bf16=getattr(args, "full_bf16", False), fused_backward_pass=getattr(args, "fused_backward_pass", False),
        mixed_precision=mixed_precision, ema=getattr(args, "use_ema", False),
        offload_ema=getattr(args, "offload_ema", False))


def model_source(args: argparse.Namespace, weight_dtype: torch.dtype) -> ModelSource:
    """With --full_bf16 the trained denoiser, and the text encoders unless they are trained fully,
    are read from disk in bf16 (the training precision) instead of fp32 first."""
    bf16 = getattr(args, "full_bf16", False)
    trains_text_encoders = getattr(args, "train_text_encoder", False) and not args.use_lora
    return ModelSource(args.pretrained_model_name_or_path, args.revision, args.variant, args.cache_dir,
                       denoiser_dtype=torch.bfloat16 if bf16 else None,
                       text_encoder_dtype=weight_dtype if bf16 and not trains_text_encoders else None)


def build_stepper(args: argparse.Namespace, optimizer, seed: int) -> OptimizerStepper:
    """`optimizer` is accelerate's wrapper; per-parameter updates use the torch optimizer inside it."""
    fused, full_bf16 = getattr(args, "fused_backward_pass", False), getattr(args, "full_bf16", False)
    if not (fused or full_bf16):
        return OptimizerStepper(optimizer)
    if fused and args.max_grad_norm:
        logger.info("Gradient clipping is off with --fused_backward_pass (no step ever holds all gradients).")
    updater = ParamUpdater(getattr(optimizer, "optimizer", optimizer), seed=seed, stochastic_rounding=full_bf16)
    return OptimizerStepper(optimizer, updater, fused=fused)


def tracker_config(args: argparse.Namespace) -> dict:
    """Trackers take scalars only; the Hub token never leaves the process."""
    config = {}
    for key, value in vars(args).items():
        if key.startswith("_") or key == "hub_token":
            continue
        if isinstance(value, (list, tuple)):
            value = " | ".join(map(str, value))
        config[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return config
