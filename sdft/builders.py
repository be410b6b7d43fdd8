"""Flags into a run: `build(args, family, make_objective, make_data) -> Run`.

This module is the only reader of the argparse namespace below the scripts (`sdft.cli` and
`sdft.checks` aside). `build` reads top to bottom in the order the run is built; the functions
after it each turn a few flags into one plain object (data, objective, optimizer, export plan),
and everything they build takes explicit, typed parameters. A script picks its builders visibly,
e.g. `build(args, family, make_objective=flow_objective, make_data=dreambooth_data)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import random
import sys
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration, broadcast_object_list, set_seed

from sdft import block_swap, host_memory, hub, memory_estimate, regional_compile
from sdft.adapter_blocks import layer_rate_groups, parse_network_args
from sdft.adapter_files import KOHYA_WEIGHT_NAME, load_adapter_file
from sdft.adapters import add_adapter
from sdft.agreement import fingerprint, model_files, require_agreement
from sdft.checkpointing import (
    MANIFEST_FILE,
    STATE_FILE,
    Checkpointer,
    Position,
    TrainedWeights,
    read_position,
    resolve_resume,
)
from sdft.checks import dataset_config_defaults, subset_conflicts
from sdft.data.archives import data_folder, is_archive
from sdft.data.buckets import BucketPlan, BucketSettings, captioned_image_sizes
from sdft.data.buckets import log_plan as log_buckets
from sdft.data.caches import CacheSettings, cache_folder, fill_caches
from sdft.data.captions import CaptionAugment
from sdft.data.dataset import CaptionedImageDataset, loader_order
from sdft.data.dataset_config import read_dataset_config
from sdft.data.dreambooth import (
    DreamBoothDataset,
    generate_class_images,
    load_class_images,
    load_instance_images,
    missing_class_images,
)
from sdft.data.held_out import split_held_out
from sdft.data.preprocess.subject import CACHE_FOLDER, SubjectPlan, prepare_subject
from sdft.data.report import data_report
from sdft.data.sources import CaptionedImages, load_captioned_images
from sdft.data.subsets import Part, SubsetDataset, kohya_folders, log_epoch, subset_images
from sdft.data.text_cache import TextCache
from sdft.data.transforms import ImageTransform
from sdft.ema import EMA
from sdft.errors import CliError, Finished, MissingFileError
from sdft.families.base_file import converted_folder, is_single_file, offline
from sdft.families.base_file import inspect as inspect_base_file
from sdft.families.protocol import Family
from sdft.families.source import ModelSource
from sdft.fused_reduce import ReducingUpdater, prepare_without_ddp
from sdft.guards import NonFiniteGuard, check_precision_device
from sdft.lora import WEIGHT_NAME, rank_and_alpha
from sdft.model_spec import describe_base, training_metadata
from sdft.nodes import Layout, output_layout, refuse_unshared
from sdft.noise_schedule import ZTSNR, check_zero_terminal_snr, markers_of, scheduler_with, settings_for
from sdft.objectives import (
    DDPMObjective,
    FlowMatchingObjective,
    ResolutionShift,
    flow_sigma_table,
    shift_sigmas,
    timestep_bias_weights,
)
from sdft.optim import (
    EvalWeights,
    build_lr_scheduler,
    build_named,
    chosen_name,
    display_name,
    flag_arguments,
    parse_optimizer_args,
    scaled_lr,
)
from sdft.plots import Pictures
from sdft.quantization import BasePrecision, quantize_frozen
from sdft.quantization import resolve as resolve_precision
from sdft.run_stats import RunStats
from sdft.sample_prompts import SamplePrompt
from sdft.sample_prompts import load as load_sample_prompts
from sdft.sharding import (
    DDP,
    Sharding,
    enable_cpu_fsdp,
    engine_of,
    fill_deepspeed_batch,
    loadable_by_rank0,
    wrap_by_blocks,
)
from sdft.stepping import OptimizerStepper, ParamUpdater
from sdft.textual_inversion import TokenEmbeddings, TokenPlan, build_token_embeddings, check_abstractions_used, stop_step
from sdft.trainable import (
    LoraSpec,
    Placement,
    enable_gradient_checkpointing,
    loraplus_groups,
    param_groups,
    prepare_models,
    trainable_params,
)
from sdft.training_run import ExportPlan, Run
from sdft.validation import SampleCadence, ValidationPlan, plan_prompts
from sdft.validation_loss import ValidationLoss

logger = logging.getLogger("sdft")
SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)

SAVE_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build(args: argparse.Namespace, family: Family, make_objective, make_data, tracker_name: str) -> Run:
    """Everything the loop and the export need, from the flags. `make_data(args, seed, accelerator,
    family)` and `make_objective(args, noise_scheduler, device)` are builders of this module."""
    # The process: accelerator, memory estimate, resume point and seed.
    accelerator = make_accelerator(args)
    args = with_base_folder(args, family, accelerator)
    output_dir = Path(args.output_dir)
    resume_dir = resolve_resume(args.resume_from_checkpoint, output_dir)
    if args.resume_from_checkpoint and resume_dir is None:
        logger.info("No checkpoint in %s; starting a new training run.", output_dir)
    seed = resolve_seed(args.seed, read_position(resume_dir) if resume_dir else None)
    set_seed(seed)

    layout = output_layout(accelerator, output_dir)
    if not layout.shared:
        refuse_unshared(output_dir, {
            "FSDP2 or DeepSpeed (checkpoints in parts from every process)": engine_of(accelerator) != DDP,
            "--caption_model / --upscale_model / --mask_model (preprocessing split over all processes)":
                bool(args.caption_model or args.upscale_model or args.mask_model),
            "an archive as the data (extracted once)": args.cache_dir is None and any(
                is_archive(path) for path in (args.train_data_dir, args.instance_data_dir) if path)})
    # accelerate writes the optimizer, scheduler and sampler states from one process unless told to
    # write them on every machine.
    accelerator.project_configuration.save_on_each_node = not layout.shared

    # Data first: a bad dataset should fail before minutes of model loading.
    dataset = make_data(args, seed, accelerator, family)
    require_agreement(accelerator, run_facts(args, resume_dir, len(dataset)))
    check_memory(args, family, accelerator, dataset)   # needs the data for the size of the text-encoder cache
    if args.dry_run:
        dry_run(args, dataset, seed)
    plan = token_plan(args)
    if plan is not None:
        check_abstractions_used(plan, [*(dataset.distinct_captions(sys.maxsize) or ()),
                                       *(p.prompt for p in sample_prompts(args, family))])
    hub_repo = None
    if args.push_to_hub and accelerator.is_main_process:
        hub_repo = hub.prepare_repo(args.hub_model_id or output_dir.name, args.hub_token)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # Models, optimizer and loop settings.
    run = build_run(args, family, make_objective, accelerator, dataset, seed, layout)
    run.export = export_plan(args, run, hub_repo)

    # Where the loop starts, and what watches it.
    if resume_dir is not None:
        logger.info("Resuming from %s", resume_dir)
        run.position = run.checkpointer.load(resume_dir).placed(run.updates_per_epoch, args.gradient_accumulation_steps)
    run.position.seed = seed
    if accelerator.is_main_process:
        accelerator.init_trackers(tracker_name, config=tracker_config(args))
        run.pictures = Pictures.attach(accelerator, output_dir)
    run.stats = RunStats(accelerator.is_main_process, accelerator.device, accelerator.num_processes)
    if args.torch_compile:
        run.stats.watch_compiling(regional_compile.compile_clock())
    log_run(run, len(dataset), args.train_batch_size, args.gradient_accumulation_steps)
    run.guard = NonFiniteGuard(accelerator, args.skip_nan_steps, run.position,
                               last_checkpoint=partial(resolve_resume, "latest", output_dir),
                               check_grad_norm=accelerator.scaler is None)
    return run


def dry_run(args: argparse.Namespace, dataset, seed: int) -> None:
    """--dry_run: print the data report (sdft.data.report) and end the run before any model loads."""
    print(data_report(dataset, batch_size=args.train_batch_size, seed=seed,
                      gradient_accumulation_steps=args.gradient_accumulation_steps,
                      max_train_steps=args.max_train_steps, num_train_epochs=args.num_train_epochs))
    raise Finished("--dry_run")


# --------------------------------------------------------------------------- the process


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    output_dir = Path(args.output_dir)
    trackers = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        kwargs_handlers=process_group_settings(args.ddp_timeout),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    check_precision_device(accelerator.mixed_precision, accelerator.device)
    if enable_cpu_fsdp(accelerator):
        logger.info("FSDP2 on CPU processes (gloo): accelerate's FSDP path, switched on by sdft.sharding.")
    wrap_by_blocks(accelerator)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def with_base_folder(args: argparse.Namespace, family: Family, accelerator: Accelerator) -> argparse.Namespace:
    """A single-file base is converted (once per file content) into a diffusers folder, which the rest
    of the run reads as any other base; `base_file` keeps the user's file for metadata and the card.
    The main process converts first so that the others find its folder."""
    if not is_single_file(args.pretrained_model_name_or_path):
        return argparse.Namespace(**{**vars(args), "base_file": None})
    base = inspect_base_file(args.pretrained_model_name_or_path, family.name)
    root = Path(args.cache_dir) / "sdft-single-file" if args.cache_dir else Path(args.output_dir) / CACHE_FOLDER
    root = root / "single_file"
    with accelerator.main_process_first():
        folder = converted_folder(base, family.pipeline_cls, args.single_file_config, root,
                                  local_files_only=offline())
    return argparse.Namespace(**{**vars(args), "pretrained_model_name_or_path": str(folder),
                                 "base_file": args.pretrained_model_name_or_path})


def process_group_settings(timeout_minutes: int | None) -> list:
    """--ddp_timeout: a long single-process phase (a cache fill, a slow sample set on a big model) must
    not trip the collective timeout of the others (kohya #971; NCCL's watchdog)."""
    if timeout_minutes is None:
        return []
    return [InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_minutes))]


def process_group_timeout(device: torch.device) -> timedelta | None:
    """The timeout the process group was created with (None: a single process, or a torch that does
    not say). Read back from torch, so the log shows what --ddp_timeout really set."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    try:
        return torch.distributed.group.WORLD._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):  # a private API: a torch without it logs nothing
        return None


def run_facts(args: argparse.Namespace, resume_dir: Path | None, examples: int) -> dict[str, str]:
    """What every process must see alike (sdft.agreement), fingerprinted by each."""
    model = Path(args.pretrained_model_name_or_path)
    resume = "none" if resume_dir is None else (
        f"{resume_dir.name} ({fingerprint(resume_dir / STATE_FILE, resume_dir / MANIFEST_FILE)})")
    data = [args.train_data_dir, args.instance_data_dir, args.class_data_dir, args.reg_data_dir, args.dataset_config]
    return {
        "the model files (--pretrained_model_name_or_path)": fingerprint(
            *model_files(model), extra=f"{args.pretrained_model_name_or_path}@{args.revision}/{args.variant}"),
        "the checkpoint to resume (--resume_from_checkpoint)": resume,
        "the training data": f"{examples} examples, " + fingerprint(*data, extra=str(args.dataset_name)),
    }


def resolve_seed(requested: int | None, resumed: Position | None) -> int:
    """The data order depends on the seed, so a resumed run must keep the seed it started with."""
    if resumed is not None and resumed.seed is not None:
        if requested is not None and requested != resumed.seed:
            logger.warning("Resuming with the checkpoint's seed %d, not --seed %d.", resumed.seed, requested)
        return resumed.seed
    if requested is not None:
        return requested
    chosen = [random.SystemRandom().randrange(2**31)]
    broadcast_object_list(chosen)  # every process must shuffle the data the same way
    return chosen[0]


def weight_dtype_of(accelerator: Accelerator) -> torch.dtype:
    """From the accelerator, not the flag: fp16 set in `accelerate config` counts too (diffusers #6363)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


# --------------------------------------------------------------------------- models, optimizer, loop settings


def build_run(args: argparse.Namespace, family: Family, make_objective, accelerator: Accelerator, dataset,
              seed: int, layout: Layout | None = None) -> Run:
    layout = layout or Layout.single()
    weight_dtype = weight_dtype_of(accelerator)
    source = model_source(args, weight_dtype)
    trained_dtype = torch.bfloat16 if args.full_bf16 else torch.float32
    models = load_models(family, source)
    quantize_frozen(family.components(models), family.denoiser_role, base_precision(args), weight_dtype)
    if args.zero_terminal_snr:
        models.noise_scheduler = scheduler_with(models.noise_scheduler, ZTSNR)
    placement = Placement(accelerator.device, weight_dtype, family.vae_dtype(weight_dtype), trained_dtype)
    trained, new_tokens = build_trained(args, family, models, placement, seed)
    ema = None
    if args.use_ema:
        ema = EMA(ema_start(family, source, trained, args), accelerator.device, foreach=args.foreach_ema,
                  offload=args.offload_ema, decay=args.ema_decay, adapter_only=args.use_lora)
    objective = make_objective(args, models.noise_scheduler, accelerator.device)
    groups = param_groups(trained, family.denoiser_role, args.text_encoder_lr, args.adam_weight_decay_text_encoder,
                          encoder_lrs(args, family), new_token_params=new_tokens.params() if new_tokens else None)
    if args.use_lora and args.network_args:   # per-block and per-pattern rates, before LoRA+ scales the up halves
        groups = layer_rate_groups(groups, trained, parse_network_args(args.network_args, family.name),
                                   family.kohya_text_encoder_prefixes, family.denoiser_role)
    if args.loraplus_lr_ratio is not None:
        groups = loraplus_groups(groups, trained, args.loraplus_lr_ratio)
    optimizer = build_optimizer(args, groups, accelerator.num_processes)
    sampler, order = loader_order(dataset, args.train_batch_size, seed)
    dataloader = accelerator.prepare(torch.utils.data.DataLoader(
        dataset, **order, collate_fn=dataset.collate, num_workers=args.dataloader_num_workers))
    updates_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    if new_tokens is not None:
        new_tokens.stop_step = stop_step(args.train_text_encoder_ti_frac, max_train_steps, args.train_unet)
    lr_scheduler = build_lr_scheduler(args.lr_scheduler, optimizer, warmup_steps=args.lr_warmup_steps,
                                      total_steps=max_train_steps, num_processes=accelerator.num_processes,
                                      num_cycles=args.lr_num_cycles, power=args.lr_power)
    fill_deepspeed_batch(accelerator, args.train_batch_size)
    loadable_by_rank0(accelerator, trained)
    if args.fused_backward_pass and accelerator.num_processes > 1:
        prepare_without_ddp(accelerator, trained.values())   # the fused hooks reduce the gradients
    *prepared, optimizer, lr_scheduler = accelerator.prepare(*trained.values(), optimizer, lr_scheduler)
    prepared = dict(zip(trained, prepared))
    # After prepare: FSDP2 replaces the parameters with sharded ones, which clipping must see.
    params = trainable_params(trained) + (new_tokens.params() if new_tokens else [])
    sharding = Sharding(accelerator, engine_of(accelerator), prepared, adapter=lora_spec(args, family))
    stepper = build_stepper(args, optimizer, seed, accelerator.device, accelerator.num_processes)
    if args.blocks_to_swap:
        block_swap.install(getattr(models, family.denoiser_role), args.blocks_to_swap, accelerator.device,
                           defer=stepper.defer)
    if args.torch_compile:
        count = regional_compile.compile_blocks(getattr(models, family.denoiser_role), args.compile_mode or "default")
        logger.info("torch.compile (%s): %d denoiser blocks compile as they first run.", args.compile_mode or "default",
                    count)
    eval_weights = EvalWeights(optimizer)
    weights = TrainedWeights(family.pipeline_cls, trained, lora=args.use_lora, ema=ema,
                             lora_key_format=family.lora_key_format, extras=[new_tokens] if new_tokens else [],
                             lora_metadata=file_metadata(args, family, models, trained, max_train_steps)
                             if args.use_lora else None,
                             kohya_prefixes=family.kohya_text_encoder_prefixes if lycoris_only(args) else None,
                             engine_saves_models=sharding.sharded)
    condition_cache, offloaded = precompute(family, models, dataset, accelerator,
                                            args.train_text_encoder or new_tokens is not None,
                                            caches=cache_settings(args), source=source,
                                            epochs=math.ceil(max_train_steps / updates_per_epoch),
                                            split=(layout.index, layout.count))
    return Run(
        accelerator=accelerator, family=family, models=models,
        train_models=dataclasses.replace(models, **prepared), prepared=list(prepared.values()),
        denoiser=prepared.get(family.denoiser_role, getattr(models, family.denoiser_role)), objective=objective,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler, dataloader=dataloader, dataset=dataset, sampler=sampler,
        checkpointer=Checkpointer(accelerator, Path(args.output_dir), args.checkpoints_total_limit, weights,
                                  eval_weights, writer=layout.writer),
        trained=weights, seed=seed, max_train_steps=max_train_steps, updates_per_epoch=updates_per_epoch,
        num_epochs=math.ceil(max_train_steps / updates_per_epoch), checkpointing_steps=args.checkpointing_steps,
        max_grad_norm=0.0 if stepper.fused else args.max_grad_norm, weight_dtype=weight_dtype,
        validation=validation_plan(args, family, seed, getattr(objective, "prediction_type", None),
                                   sample_pipeline_kwargs(args, family, models),
                                   new_tokens.plan.apply_all if new_tokens else None),
        cadence=sample_cadence(args), output_dir=Path(args.output_dir), source=source,
        dream_detail_preservation=args.dream_detail_preservation if args.dream_training else None,
        params_to_clip=params, train_text_encoders=args.train_text_encoder,
        text_encoder_stop_step=stop_step(args.train_text_encoder_frac, max_train_steps, True)
        if args.train_text_encoder and args.train_text_encoder_frac < 1 else None,
        prior_loss_weight=args.prior_loss_weight if args.with_prior_preservation else None,
        debug_loss=args.debug_loss, condition_cache=condition_cache, offloaded=offloaded,
        token_embeddings=new_tokens, masked_loss=args.masked_loss, stepper=stepper, eval_weights=eval_weights,
        val_loss=held_out_loss(args, accelerator, dataset, family, objective, weight_dtype, offloaded, seed,
                               caption_map=new_tokens.plan.apply_all if new_tokens else None),
        scheduler_settings=settings_for(args.prediction_type, args.zero_terminal_snr), sharding=sharding,
    )


def build_trained(args: argparse.Namespace, family: Family, models, placement: Placement,
                  seed: int) -> tuple[dict, TokenEmbeddings | None]:
    """The modules that train (full or LoRA), and the new token embeddings of --train_text_encoder_ti."""
    frozen = {role for role, lr in encoder_lrs(args, family).items() if lr == 0}   # --learning_rate_te1/2 0
    roles = ([family.denoiser_role] if args.train_unet else []) + (
        [r for r in family.trainable_text_encoder_roles if r not in frozen] if args.train_text_encoder else [])
    trained = prepare_models(family, models, roles, placement, lora=lora_spec(args, family),
                             gradient_checkpointing=args.gradient_checkpointing,
                             xformers=args.enable_xformers_memory_efficient_attention,
                             npu_flash_attention=args.enable_npu_flash_attention)
    if args.use_lora and args.init_lora is not None:
        load_adapter_file(args.init_lora, trained, family.pipeline_cls, family.kohya_text_encoder_prefixes)
    new_tokens = token_embeddings(args, family, models, seed)
    if not args.train_unet and args.gradient_checkpointing:
        # Frozen, but the embeddings' gradient still flows back through it.
        enable_gradient_checkpointing(getattr(models, family.denoiser_role), needs_input_grads=False)
    return trained, new_tokens


def encoder_lrs(args: argparse.Namespace, family: Family) -> dict[str, float]:
    """SDXL's --learning_rate_te1/--learning_rate_te2 by encoder role (those given)."""
    given = zip(family.trainable_text_encoder_roles, (args.learning_rate_te1, args.learning_rate_te2))
    return {role: lr for role, lr in given if lr is not None}


def held_out_loss(args: argparse.Namespace, accelerator: Accelerator, dataset, family: Family, objective,
                  weight_dtype: torch.dtype, offloaded: list[str], seed: int,
                  caption_map=None) -> ValidationLoss | None:
    held_out = getattr(dataset, "held_out", None)
    if held_out is None:
        return None
    val_loss = ValidationLoss(held_out, args.train_batch_size, validation_seed(args, seed),
                              args.validate_every_n_steps, family, objective, weight_dtype, offloaded, caption_map)
    val_loss.register(accelerator)
    return val_loss


def precompute(family: Family, models, dataset, accelerator: Accelerator, train_text_encoders: bool, *,
               caches: CacheSettings, source: ModelSource, caption_limit: int = 64, epochs: int = 1,
               split: tuple[int, int] | None = None) -> tuple[TextCache | None, list[str]]:
    """Encode what will not change during training once (sdft.data.caches), then park the encoders
    on the CPU."""
    cache, offloaded = fill_caches(family, models, dataset, accelerator, caches, source,
                                   train_text_encoders=train_text_encoders, caption_limit=caption_limit,
                                   epochs=epochs, split=split)
    for role in offloaded:
        getattr(models, role).to("cpu")
    return cache, offloaded


def lora_spec(args: argparse.Namespace, family: Family) -> LoraSpec | None:
    if not args.use_lora:
        return None
    # LoCon is LoRA on the 3x3 convolutions too: kohya's conv_dim, reached here through the `full` preset;
    # SD3 (no --lora_targets) adds its convolutions to the --lora_layers names.
    locon = args.lora_type == "locon"
    preset = "full" if locon and not family.lora_conv_targets else args.lora_targets
    targets = family.lora_target_modules + (list(family.lora_conv_targets) if locon else [])
    return LoraSpec(rank=args.rank, denoiser_targets=targets, dropout=args.lora_dropout,
                    alpha=args.lora_alpha, adapter=args.lora_type, use_dora=args.use_dora, preset=preset,
                    regex=args.lora_target_regex, conv_rank=args.conv_rank, conv_alpha=args.conv_alpha,
                    lokr_factor=args.lokr_factor, rank_dropout=args.rank_dropout, module_dropout=args.module_dropout,
                    blocks=parse_network_args(args.network_args, family.name))


def lycoris_only(args: argparse.Namespace) -> bool:
    """LoHa and LoKr: diffusers' LoRA files cannot hold them, so their files (checkpoints included)
    are the kohya/LyCORIS layout."""
    return args.use_lora and args.lora_type in ("loha", "lokr")


def validation_prompts(args: argparse.Namespace) -> list[str]:
    return plan_prompts(args.validation_prompts, args.validation_prompt, args.num_validation_images)


def sample_prompts(args: argparse.Namespace, family: Family) -> list[SamplePrompt]:
    """--validation_prompt(s), then the prompts of --sample_prompts."""
    prompts = [SamplePrompt(text) for text in validation_prompts(args)]
    if args.sample_prompts:
        prompts += load_sample_prompts(args.sample_prompts, **sample_file_rules(family.name))
    return prompts


def sample_file_rules(family_name: str) -> dict:
    """What a prompt file's sizes must divide into, and whether it takes SD3's flow samplers."""
    return {"multiple": 16, "flow": True} if family_name == "sd3" else {"multiple": 8, "flow": False}


def sample_pipeline_kwargs(args: argparse.Namespace, family: Family, models) -> dict:
    """What every sample's pipeline call gets besides its prompt (Family.prompt_inputs encodes that
    as training does): --sample_slg."""
    kwargs = {}
    if args.sample_slg:
        layers = [int(layer) for layer in args.sample_slg.split(",")]
        blocks = getattr(models, family.denoiser_role).config.num_layers
        if max(layers) >= blocks:
            raise CliError(f"--sample_slg {args.sample_slg}: this transformer has blocks 0 to {blocks - 1}.")
        kwargs["skip_guidance_layers"] = layers
    return kwargs


def validation_plan(args: argparse.Namespace, family: Family, seed: int, prediction_type: str | None,
                    pipeline_kwargs: dict, caption_map=None) -> ValidationPlan:
    """The prompts of every sample set; `caption_map` writes new tokens into them (pivotal tuning)."""
    prompts = sample_prompts(args, family)
    if caption_map is not None:
        prompts = [dataclasses.replace(p, prompt=caption_map([p.prompt])[0]) for p in prompts]
    return ValidationPlan(prompts, seed=seed, resolution=args.resolution, sampler=args.sample_sampler,
                          prediction_type=prediction_type, pipeline_kwargs=pipeline_kwargs,
                          prompt_inputs=family.prompt_inputs)


def sample_cadence(args: argparse.Namespace) -> SampleCadence:
    """kohya's --sample_every_n_steps (or --validation_steps) and --sample_every_n_epochs; with a step
    cadence, --validation_epochs (whose default is always set) no longer applies."""
    every_n_steps = args.sample_every_n_steps or args.validation_steps
    every_n_epochs = args.sample_every_n_epochs or (None if every_n_steps else args.validation_epochs)
    return SampleCadence(every_n_steps, every_n_epochs, at_first=args.sample_at_first)


def load_models(family: Family, source: ModelSource):
    try:
        return family.load(source)
    except OSError as err:
        raise MissingFileError(f"Could not load the model '{source.path}': {err}") from err


def ema_start(family: Family, source: ModelSource, trained: dict[str, torch.nn.Module],
              args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """Where the average of each trained model starts: the denoiser's from --revision (with
    --non_ema_revision the trained copy came from elsewhere); a trained text encoder's from itself.
    With --use_lora only the denoiser's adapter weights are averaged, from where they start (--init_lora
    included)."""
    if args.use_lora:
        return {family.denoiser_role: trained[family.denoiser_role]}
    if args.non_ema_revision not in (None, args.revision) and family.denoiser_role in trained:
        return {**trained, family.denoiser_role: family.load_denoiser(source)}
    return dict(trained)


def log_run(run: Run, num_examples: int, batch_size: int, accumulation: int) -> None:
    total_batch = batch_size * run.accelerator.num_processes * accumulation
    logger.info("***** Training *****")
    logger.info("  examples = %d, epochs = %d, batch per device = %d, total batch = %d, accumulation = %d",
                num_examples, run.num_epochs, batch_size, total_batch, accumulation)
    logger.info("  optimizer steps = %d, seed = %d, optimizer = %s", run.max_train_steps, run.seed,
                type(run.optimizer.optimizer).__name__)
    logger.info("  engine = %s", run.sharding.engine)
    timeout = process_group_timeout(run.accelerator.device)
    if timeout is not None:
        logger.info("  processes = %d, process-group timeout = %s", run.accelerator.num_processes, timeout)


# --------------------------------------------------------------------------- what the export writes


def export_plan(args: argparse.Namespace, run: Run, hub_repo: str | None) -> ExportPlan:
    """Decided now, so that `output.finish` reads no flag."""
    single_file = args.save_single_file and not args.use_lora
    return ExportPlan(
        lora=args.use_lora, kohya_lora=args.use_lora and (args.output_kohya_format or lycoris_only(args)),
        diffusers_lora=not lycoris_only(args), adapter=lora_spec(args, run.family),
        lora_dtype=None if args.upcast_before_saving else run.weight_dtype,
        scheduler_settings=settings_for(args.prediction_type, args.zero_terminal_snr),
        markers=markers_of({**run.models.noise_scheduler.config, **settings_for(args.prediction_type, False)})
        if single_file and run.family.name != "sd3" else (),
        single_file_dtype=SAVE_PRECISIONS.get(args.save_precision, run.weight_dtype) if single_file else None,
        metadata=file_metadata(args, run.family, run.models, run.trained.modules, run.max_train_steps)
        if single_file else {},
        card=model_card(args, run), hub_repo=hub_repo, hub_token=args.hub_token, base_precision=base_precision(args),
    )


def file_metadata(args: argparse.Namespace, family: Family, models, trained: dict[str, torch.nn.Module],
                  steps: int) -> dict[str, str]:
    """The ss_*/modelspec.* header of the files users load in UIs (LoRA files, single-file checkpoints)."""
    denoiser = getattr(models, family.denoiser_role)   # trained or not (--train_unet false)
    prediction = args.prediction_type or models.noise_scheduler.config.get("prediction_type")
    base = describe_base(family.name, dict(denoiser.config), prediction)
    return training_metadata(base, base_model=args.base_file or args.pretrained_model_name_or_path,
                             title=Path(args.output_dir).name, resolution=args.resolution, steps=steps,
                             clip_skip=args.clip_skip,
                             zero_terminal_snr=bool(models.noise_scheduler.config.get("rescale_betas_zero_snr")),
                             lora=rank_and_alpha(trained) if args.use_lora else None,
                             network=lora_spec(args, family) if args.use_lora else None)


def model_card(args: argparse.Namespace, run: Run) -> hub.CardInfo:
    """The model card, less the images, pictures, run summary and best val_loss of the finished run."""
    family, new_tokens = run.family, run.token_embeddings
    instance_prompt = args.instance_prompt
    embeddings = None
    if new_tokens is not None:
        instance_prompt = new_tokens.plan.apply(instance_prompt) if instance_prompt else None
        embeddings = hub.EmbeddingsInfo(
            file=f"{run.output_dir.name}_emb.safetensors", tokens=new_tokens.plan.tokens,
            triggers=new_tokens.plan.triggers(), in_pipeline=not args.use_lora,
            encoders=[(e.key, e.role, e.tokenizer_role) for e in new_tokens.encoders])
    return hub.CardInfo(
        base_model=args.base_file or args.pretrained_model_name_or_path, title=run.output_dir.name, license=family.license,
        tags=family.tags, lora=args.use_lora, pipeline_class=family.pipeline_cls.__name__,
        dataset=args.dataset_name, instance_prompt=instance_prompt, embeddings=embeddings,
        training={"steps": run.max_train_steps, "learning rate": args.learning_rate,
                  "optimizer": optimizer_description(args),
                  "batch size per device": args.train_batch_size, "resolution": args.resolution,
                  "mixed precision": run.accelerator.mixed_precision,
                  **({"LoRA rank": args.rank} if args.use_lora else {}),
                  **({"EMA": "yes"} if run.trained.ema is not None else {}),
                  **({"base weights": base_precision(args).describe()} if base_precision(args).any else {})},
        ui_files=ui_files(args, run), clip_skip=args.clip_skip, max_token_length=args.max_token_length,
    )


def optimizer_description(args: argparse.Namespace) -> str:
    """For the model card: the optimizer and the arguments typed for it."""
    name = display_name(chosen_name(args.optimizer_type, args.optimizer, args.use_8bit_adam))
    return " ".join([name, *(args.optimizer_args or [])])


def ui_files(args: argparse.Namespace, run: Run) -> dict[str, str]:
    """The files of the output folder that ComfyUI, A1111 and Forge load, for the model card."""
    files = {}
    if args.use_lora and (args.output_kohya_format or lycoris_only(args)):
        files[KOHYA_WEIGHT_NAME] = "lora"
    elif args.use_lora and run.family.name == "sd3":
        files[WEIGHT_NAME] = "lora"
    elif not args.use_lora and args.save_single_file:
        files[f"{run.output_dir.name}.safetensors"] = "checkpoint"
    if run.token_embeddings is not None:
        files[f"{run.output_dir.name}_emb.safetensors"] = "embedding"
    return files


# --------------------------------------------------------------------------- data


def image_transform(args: argparse.Namespace) -> ImageTransform:
    return ImageTransform(args.resolution, args.center_crop, args.random_flip,
                          args.image_interpolation_mode,
                          crop_to_mask=args.crop_to_mask)


def cache_root(args: argparse.Namespace) -> Path:
    """Extracted archives and upscaled images live here, reused by later runs into the same folder."""
    return Path(args.output_dir) / CACHE_FOLDER


def subject_plan(args: argparse.Namespace, root: Path | None) -> SubjectPlan:
    return SubjectPlan(
        resolution=args.resolution, output_dir=Path(args.output_dir), root=root, model_cache_dir=args.cache_dir,
        caption_model=args.caption_model, caption_prefix=args.caption_prefix or "",
        upscale_model=args.upscale_model, mask_data_dir=args.mask_data_dir,
        alpha_mask=args.alpha_mask, mask_model=args.mask_model,
        mask_target_prompts=tuple(args.mask_target_prompts or ()),
        need_masks=args.masked_loss or args.crop_to_mask,
    )


def bucket_settings(args: argparse.Namespace) -> BucketSettings | None:
    if not args.enable_bucket:
        return None
    return BucketSettings(args.resolution, args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps,
                          args.bucket_no_upscale)


def bucket_plan(args: argparse.Namespace, images: CaptionedImages, what: str = "training") -> BucketPlan | None:
    """The buckets of `images` under --enable_bucket (None without), logged as a table."""
    settings = bucket_settings(args)
    if settings is None:
        return None
    plan = BucketPlan.build(captioned_image_sizes(images), settings)
    log_buckets(plan, images.name, settings, what)
    return plan


def validation_seed(args: argparse.Namespace, seed: int) -> int:
    chosen = args.validation_seed
    return seed if chosen is None else chosen


def text_image_data(args: argparse.Namespace, seed: int, accelerator: Accelerator, family: Family) -> CaptionedImageDataset:
    data_dir, _ = data_folder(args.train_data_dir, cache_root(args), accelerator)
    folders = kohya_folders(Path(data_dir)) if data_dir is not None and args.dataset_name is None else None
    if folders:
        return folder_data(args, seed, folders)
    if args.reg_data_dir is not None:
        raise CliError("--reg_data_dir needs kohya N_name folders in --train_data_dir (e.g. 10_sks dog).")
    images = load_captioned_images(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
        train_data_dir=data_dir, image_column=args.image_column, caption_column=args.caption_column,
        cache_dir=args.cache_dir, max_train_samples=args.max_train_samples, seed=seed,
        allow_missing_captions=args.caption_model is not None,
    )
    root = Path(data_dir) if data_dir is not None and args.dataset_name is None else None
    images = prepare_subject(images, subject_plan(args, root), accelerator)
    images, held_out = split_held_out(images, args.validation_split, validation_seed(args, seed))
    if args.validation_data_dir is not None:
        held_out = load_captioned_images(
            dataset_name=None, dataset_config_name=None, train_data_dir=args.validation_data_dir,
            image_column=args.image_column, caption_column=args.caption_column, cache_dir=args.cache_dir,
            max_train_samples=None, seed=seed)
    dataset = CaptionedImageDataset(images, image_transform(args), seed,
                                    empty_caption_rate=args.proportion_empty_prompts,
                                    buckets=bucket_plan(args, images), captions=caption_augment(args))
    if held_out is not None:
        dataset.held_out = CaptionedImageDataset(held_out, image_transform(args), validation_seed(args, seed),
                                                 buckets=bucket_plan(args, held_out, "held-out"))
    return dataset


def caption_augment(args: argparse.Namespace) -> CaptionAugment:
    """kohya's caption flags (every script); a --dataset_config overrides them per subset."""
    return CaptionAugment(
        shuffle=args.shuffle_caption, keep_tokens=args.keep_tokens, keep_tokens_separator=args.keep_tokens_separator,
        separator=args.caption_separator, secondary_separator=args.secondary_separator,
        dropout_rate=args.caption_dropout_rate, dropout_every_n_epochs=args.caption_dropout_every_n_epochs,
        tag_dropout_rate=args.caption_tag_dropout_rate)


def config_data(args: argparse.Namespace, seed: int, accelerator: Accelerator, family: Family) -> SubsetDataset:
    """The subsets of --dataset_config (checked at parse time; read again here, cheaply)."""
    config = read_dataset_config(args.dataset_config, dataset_config_defaults(args))
    parts = []
    for group, spec in enumerate(config.datasets):
        settings = (BucketSettings(spec.resolution, spec.min_bucket_reso, spec.max_bucket_reso, spec.bucket_reso_steps,
                                   spec.bucket_no_upscale) if spec.enable_bucket else None)
        for subset in spec.subsets:
            images = subset_images(subset.image_dir, subset.caption_extension, subset.class_tokens,
                                   subset.metadata_file, fallback_caption(args), f"{config.path}: {subset.where}")
            transform = ImageTransform(spec.resolution, not subset.random_crop, subset.flip_aug,
                                       args.image_interpolation_mode)
            parts.append(Part(subset.where, images, subset.num_repeats, subset.captions, transform,
                              subset_buckets(images, settings, subset.where), spec.batch_size, group, subset.is_reg))
    return subset_dataset(parts, seed, args.prior_loss_weight)


def folder_data(args: argparse.Namespace, seed: int, folders: list[tuple[Path, int, str]]) -> SubsetDataset:
    """kohya's N_name folders in --train_data_dir: one subset each, N repeats, `name` the caption of
    images without a caption file; everything else from the flags."""
    typed = subset_conflicts(args)
    if typed:
        raise CliError(f"--train_data_dir holds kohya N_name folders, which do not combine with {', '.join(typed)} yet.")
    settings = bucket_settings(args)
    reg = []
    if args.reg_data_dir is not None:
        reg = kohya_folders(Path(args.reg_data_dir))
        if not reg:
            raise CliError(f"--reg_data_dir '{args.reg_data_dir}' must hold N_name folders only (e.g. 1_dog), "
                           "as --train_data_dir does.")
    parts = []
    for (folder, repeats, tokens), is_reg in [*((f, False) for f in folders), *((f, True) for f in reg)]:
        images = subset_images(folder, args.caption_extension, tokens, None, None, str(folder))
        parts.append(Part(folder.name, images, repeats, caption_augment(args), image_transform(args),
                          subset_buckets(images, settings, folder.name), args.train_batch_size, 0, is_reg))
    return subset_dataset(parts, seed, args.prior_loss_weight)


def subset_dataset(parts: list[Part], seed: int, reg_weight: float) -> SubsetDataset:
    dataset = SubsetDataset(parts, seed, reg_weight)
    log_epoch(dataset)
    return dataset


def subset_buckets(images: CaptionedImages, settings: BucketSettings | None, where: str) -> BucketPlan | None:
    if settings is None:
        return None
    plan = BucketPlan.build(captioned_image_sizes(images), settings)
    log_buckets(plan, images.name, settings, where)
    return plan


def fallback_caption(args: argparse.Namespace) -> str | None:
    """With --dataset_config, --instance_prompt (required in SD3, by diffusers' contract; optional
    elsewhere) is the caption of images that have neither a caption file nor class_tokens."""
    return args.instance_prompt


def dreambooth_data(args: argparse.Namespace, seed: int, accelerator: Accelerator, family: Family) -> DreamBoothDataset:
    instance_dir, from_archive = data_folder(args.instance_data_dir, cache_root(args), accelerator)
    instance = load_instance_images(
        instance_data_dir=instance_dir, dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name, image_column=args.image_column,
        caption_column=args.caption_column, instance_prompt=args.instance_prompt, cache_dir=args.cache_dir,
        recursive=from_archive, auto_caption=args.caption_model is not None,
    )
    instance = prepare_subject(instance, subject_plan(args, Path(instance_dir) if instance_dir else None), accelerator)
    class_images = None
    if args.with_prior_preservation:
        class_dir, nested = data_folder(args.class_data_dir, cache_root(args), accelerator)
        missing = missing_class_images(class_dir, args.num_class_images, recursive=nested)
        if missing and args.dry_run:   # generating them would load the model
            logger.info("--dry_run: %d class images would be generated for '%s'.", missing, args.class_prompt)
        elif missing:
            logger.info("Generating %d class images for '%s'", missing, args.class_prompt)
            generate_class_images(Path(class_dir), args.class_prompt, missing,
                                  class_image_pipeline(args, family, accelerator.device),
                                  sample_batch_size=args.sample_batch_size, accelerator=accelerator, seed=seed,
                                  start_index=args.num_class_images - missing)
        class_images = load_class_images(class_dir, recursive=nested)[: args.num_class_images]
        if args.dry_run and not class_images:
            class_images = None   # none generated yet: the report shows the instance images only
    instance, held_out = split_held_out(instance, args.validation_split, validation_seed(args, seed))
    if args.validation_data_dir is not None:
        held_out = load_instance_images(
            instance_data_dir=args.validation_data_dir, dataset_name=None, dataset_config_name=None,
            image_column=args.image_column, caption_column=None, instance_prompt=args.instance_prompt,
            cache_dir=args.cache_dir)
    dataset = DreamBoothDataset(instance, image_transform(args), seed, repeats=args.repeats,
                                class_images=class_images, class_prompt=args.class_prompt,
                                buckets=bucket_plan(args, instance), captions=caption_augment(args))
    if held_out is not None:
        dataset.held_out = DreamBoothDataset(held_out, image_transform(args), validation_seed(args, seed),
                                             buckets=bucket_plan(args, held_out, "held-out"))
    return dataset


class ClassImagePipeline:
    """Builds the base pipeline for class-image generation only when images are missing."""

    def __init__(self, family: Family, source: ModelSource, precision: str | None, device: torch.device):
        self.family, self.source, self.precision, self.device = family, source, precision, device

    def __call__(self):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "no": torch.float32}.get(
            self.precision, torch.float16 if self.device.type in ("cuda", "mps") else torch.float32)
        pipeline = self.family.pipeline_cls.from_pretrained(self.source.path, revision=self.source.revision,
                                                            variant=self.source.variant, dtype=dtype)
        return pipeline.to(self.device)


def class_image_pipeline(args: argparse.Namespace, family: Family, device: torch.device) -> ClassImagePipeline:
    source = ModelSource(args.pretrained_model_name_or_path, args.revision, args.variant)
    return ClassImagePipeline(family, source, args.prior_generation_precision, device)


def token_plan(args: argparse.Namespace) -> TokenPlan | None:
    if not args.train_text_encoder_ti:
        return None
    return TokenPlan.from_flags(args.token_abstraction, args.num_new_tokens_per_abstraction)


def token_embeddings(args: argparse.Namespace, family, models, seed: int) -> TokenEmbeddings | None:
    """The new tokens of --train_text_encoder_ti, added to the loaded tokenizers and encoders."""
    plan = token_plan(args)
    if plan is None:
        return None
    return build_token_embeddings(family, models, plan, seed=seed, initializer_concept=args.initializer_concept)


def cache_settings(args: argparse.Namespace) -> CacheSettings:
    latents_to_disk = args.cache_latents_to_disk
    text_to_disk = args.cache_text_encoder_outputs_to_disk
    return CacheSettings(
        latents=args.cache_latents or latents_to_disk, latents_to_disk=latents_to_disk,
        text=args.cache_text_encoder_outputs or text_to_disk, text_to_disk=text_to_disk,
        folder=cache_folder(args.latents_cache_dir, args.output_dir) if latents_to_disk or text_to_disk else None)


def ddpm_objective(args: argparse.Namespace, noise_scheduler, device: torch.device) -> DDPMObjective:
    prediction_type = args.prediction_type or noise_scheduler.config.prediction_type
    message = check_zero_terminal_snr(prediction_type, noise_scheduler.config.get("rescale_betas_zero_snr", False),
                                      "--zero_terminal_snr" if args.zero_terminal_snr else "the base model's")
    if message:   # a Hub base's prediction type is known only now
        raise CliError(message)
    if args.dream_training and prediction_type != "epsilon":
        raise CliError(f"--dream_training supports epsilon prediction only; this model predicts {prediction_type}.")
    try:  # the checks that need the schedule's length (the others ran at parse time)
        weights = bias_weights(args, noise_scheduler.config.num_train_timesteps)
        return DDPMObjective(
            alphas_cumprod=noise_scheduler.alphas_cumprod.to(device=device, dtype=torch.float32),
            prediction_type=prediction_type, snr_gamma=args.snr_gamma, noise_offset=args.noise_offset,
            input_perturbation=args.input_perturbation if args.ip_noise_gamma is None else args.ip_noise_gamma,
            timestep_weights=None if weights is None else weights.to(device),
            **loss_type_fields(args),
            debiased_estimation=args.debiased_estimation_loss,
            min_timestep=args.min_timestep, max_timestep=args.max_timestep,
            noise_offset_random_strength=args.noise_offset_random_strength,
            adaptive_noise_scale=args.adaptive_noise_scale,
            multires_noise_iterations=args.multires_noise_iterations or 0,
            multires_noise_discount=args.multires_noise_discount,
            input_perturbation_random_strength=args.ip_noise_gamma_random_strength,
        )
    except ValueError as err:
        raise CliError(f"{err}.") from err


def bias_weights(args: argparse.Namespace, num_timesteps: int) -> torch.Tensor | None:
    """--timestep_bias_* as sampling weights; refused when a --min_timestep/--max_timestep window
    leaves none of the biased timesteps in it (the bias would silently do nothing)."""
    if args.timestep_bias_strategy == "none":
        return None
    weights = timestep_bias_weights(
        args.timestep_bias_strategy, num_timesteps, multiplier=args.timestep_bias_multiplier,
        begin=args.timestep_bias_begin, end=args.timestep_bias_end, portion=args.timestep_bias_portion)
    if args.min_timestep is None and args.max_timestep is None:
        return weights
    low = args.min_timestep or 0
    high = num_timesteps if args.max_timestep is None else min(args.max_timestep, num_timesteps)
    inside = weights[low:high]
    if args.timestep_bias_multiplier != 1.0 and inside.numel() and bool((inside == inside[0]).all()):
        raise ValueError(f"--timestep_bias_strategy {args.timestep_bias_strategy} biases no timestep inside "
                         f"--min_timestep/--max_timestep [{low}, {high}), or all of them: the bias would have no "
                         "effect")
    return weights


def loss_type_fields(args: argparse.Namespace) -> dict:
    return {"loss_type": args.loss_type, "huber_schedule": args.huber_schedule, "huber_c": args.huber_c,
            "huber_scale": args.huber_scale}


def flow_objective(args: argparse.Namespace, noise_scheduler, device: torch.device) -> FlowMatchingObjective:
    resolution = resolution_shift(noise_scheduler.config) if args.resolution_dependent_shift else None
    replaced = args.training_shift is not None or resolution is not None
    sigmas, timesteps = flow_table(noise_scheduler, unshift=replaced)
    try:
        return FlowMatchingObjective(
            scheduler_sigmas=sigmas.to(device), scheduler_timesteps=timesteps.to(device),
            weighting_scheme=args.weighting_scheme, logit_mean=args.logit_mean, logit_std=args.logit_std,
            mode_scale=args.mode_scale, precondition_outputs=bool(args.precondition_outputs),
            **loss_type_fields(args), timestep_sampling=args.timestep_sampling, shift=args.training_shift,
            resolution_shift=resolution, num_train_timesteps=noise_scheduler.config.num_train_timesteps,
        )
    except ValueError as err:
        raise CliError(f"{err}.") from err


def flow_table(noise_scheduler, unshift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The scheduler's training table; with `unshift`, without the scheduler's static shift, so that
    --training_shift / --resolution_dependent_shift replace it (kohya's meaning) instead of
    multiplying it (the shift maps compose by multiplying: shift(shift(s, a), 1/a) = s)."""
    sigmas, timesteps = flow_sigma_table(noise_scheduler)
    config = noise_scheduler.config
    shift = config.get("shift", 1.0)
    if not unshift or config.get("use_dynamic_shifting", False) or shift == 1.0:
        return sigmas, timesteps
    sigmas = shift_sigmas(sigmas, 1.0 / shift)
    return sigmas, sigmas * config.num_train_timesteps


def resolution_shift(config) -> ResolutionShift:
    """SD3's dynamic-shifting settings from the scheduler config (defaults: the scheduler's own)."""
    defaults = ResolutionShift()
    return ResolutionShift(
        base_seq_len=config.get("base_image_seq_len", defaults.base_seq_len),
        max_seq_len=config.get("max_image_seq_len", defaults.max_seq_len),
        base_shift=config.get("base_shift", defaults.base_shift),
        max_shift=config.get("max_shift", defaults.max_shift))


def build_optimizer(args: argparse.Namespace, groups: list[dict], num_processes: int) -> torch.optim.Optimizer:
    """--optimizer_type (or --optimizer/--use_8bit_adam), with the --adam_* and --prodigy_* flags'
    values where the optimizer takes them and --optimizer_args over them."""
    lr = args.learning_rate
    if args.scale_lr:
        lr = scaled_lr(lr, args.gradient_accumulation_steps, args.train_batch_size, num_processes)
    name = chosen_name(args.optimizer_type, args.optimizer, args.use_8bit_adam)
    kwargs = flag_arguments(name, {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
                                   "weight_decay": args.adam_weight_decay})
    for group in groups:   # LoRA+: a multiple of the group's own rate (sdft.trainable.loraplus_groups)
        if "lr_scale" in group:
            group["lr"] = group.get("lr", lr) * group.pop("lr_scale")
    if name == "prodigy":
        if lr <= 0.1:
            logger.warning("Prodigy usually wants --learning_rate around 1.0, got %g.", lr)
        own = [group.get("name", "a group") for group in groups if group.pop("lr", None) is not None]
        if own:
            # Prodigy estimates one step size; prodigyopt refuses other rates per group.
            logger.warning("Prodigy uses --learning_rate for every parameter group; the own rate of %s is "
                           "ignored.", ", ".join(own))
        kwargs.update(beta3=args.prodigy_beta3, decouple=args.prodigy_decouple,
                      use_bias_correction=args.prodigy_use_bias_correction,
                      safeguard_warmup=args.prodigy_safeguard_warmup)
    return build_named(name, groups, lr, {**kwargs, **parse_optimizer_args(args.optimizer_args)})


def check_accelerator_flags(args: argparse.Namespace, accelerator) -> None:
    """The flag combinations the accelerator (processes, engine, precision, device) decides."""
    fused, full_bf16 = args.fused_backward_pass, args.full_bf16
    if fused and accelerator.distributed_type in SHARDED:
        # sdft.fused_reduce replaces DDP's reducer; a sharded model's gradients are its shards.
        raise CliError(f"--fused_backward_pass works with plain data parallelism (accelerate's multi-GPU or multi-CPU "
                       f"launch), not with {accelerator.distributed_type}; drop one of them.")
    if fused and accelerator.mixed_precision == "fp16":
        raise CliError("--fused_backward_pass cannot be used with fp16 mixed precision (set in the accelerate "
                       "config here); use --mixed_precision bf16.")
    no_compiler = regional_compile.missing_compiler(accelerator.device) if args.torch_compile else None
    if no_compiler:
        raise CliError(no_compiler)
    if args.blocks_to_swap and accelerator.num_processes > 1:
        raise CliError(f"--blocks_to_swap works with one process only, not {accelerator.num_processes}.")
    if full_bf16 and not fused and accelerator.num_processes > 1 and accelerator.distributed_type not in SHARDED:
        # Found 2026-12-07: under DDP the replicas' bf16 weights end up different (the export's check
        # stops the run); the fused pass reduces the gradients itself (sdft.fused_reduce) and agrees.
        raise CliError(f"--full_bf16 on {accelerator.num_processes} processes needs --fused_backward_pass for now: "
                       "without it the processes' bf16 weights drift apart. Add --fused_backward_pass, or drop "
                       "--full_bf16 to keep fp32 weights under --mixed_precision bf16.")
    if full_bf16 and accelerator.mixed_precision != "bf16":
        raise CliError(f"--full_bf16 needs --mixed_precision bf16; this run's is '{accelerator.mixed_precision}'.")


def check_memory(args: argparse.Namespace, family, accelerator: Accelerator, dataset=None) -> None:
    """Before any weight is loaded: the flags the accelerator decides, then the memory estimate
    (printed, and refused when it exceeds the device's memory unless --skip_memory_check)."""
    check_accelerator_flags(args, accelerator)
    try:
        model = memory_estimate.denoiser_model(args.pretrained_model_name_or_path, family.denoiser_role,
                                               args.revision, args.cache_dir)
    except (OSError, KeyError, AttributeError, ValueError) as err:  # the model loader reports a bad model better
        logger.warning("No memory estimate: the %s config could not be read (%s).", family.denoiser_role, err)
        return
    stats = memory_estimate.ParamStats.of_module(model)
    add_adapters = partial(add_adapter, spec=lora_spec(args, family), is_denoiser=True)
    adapters = memory_estimate.adapter_stats(model, add_adapters) if args.use_lora else None
    try:
        beside = memory_beside(args, family, accelerator, dataset)
    except (OSError, KeyError, AttributeError, ValueError, TypeError, IndexError) as err:
        logger.warning("The memory estimate leaves out the frozen components and caches (%s).", err)
        beside = None
    try:
        logger.info("%s", memory_estimate.check(stats, memory_setup(args, accelerator.mixed_precision, adapters),
                                                family.denoiser_role, accelerator.device,
                                                skip=args.skip_memory_check, beside=beside))
    except memory_estimate.DoesNotFit as err:
        raise CliError(str(err)) from err


def memory_beside(args: argparse.Namespace, family, accelerator: Accelerator, dataset) -> list:
    """The estimate's lines for what the run holds beside the trained model (issue 26): the frozen text
    encoders and VAE at the dtype they are kept in, the caches and, on the CPU, the libraries."""
    from diffusers import DiffusionPipeline

    me, path, revision, cache_dir = memory_estimate, args.pretrained_model_name_or_path, args.revision, args.cache_dir
    weight_dtype = weight_dtype_of(accelerator)
    index = DiffusionPipeline.load_config(path, revision=revision, cache_dir=cache_dir)
    text_roles = [] if args.train_text_encoder else sorted(
        role for role, value in index.items() if role.startswith("text_encoder") and value and value[0])
    lines = [me.frozen_line(role, me.component_params(path, role, revision, cache_dir), weight_dtype.itemsize)
             for role in text_roles]
    lines.append(me.frozen_line("vae", me.component_params(path, "vae", revision, cache_dir),
                                family.vae_dtype(weight_dtype).itemsize))
    in_ram = args.cache_text_encoder_outputs and not args.cache_text_encoder_outputs_to_disk
    captions = dataset.distinct_captions(math.inf if in_ram else 64) if dataset is not None and text_roles else None
    if captions:
        values = me.caption_values(path, text_roles, revision, cache_dir,
                                   family.text_settings().get("max_sequence_length", me.CACHED_TOKENS))
        lines.append(me.text_cache_line(len(captions), values, weight_dtype.itemsize))
    if args.cache_latents and not args.cache_latents_to_disk and dataset is not None:
        channels = 16 if family.name == "sd3" else 4
        lines.append(me.latent_cache_line(len(dataset) * (2 if args.random_flip else 1),
                                          2 * channels * (args.resolution // 8) ** 2))
    runtime = me.runtime_line(accelerator.device)
    return lines + ([runtime] if runtime else [])


def memory_setup(args: argparse.Namespace, mixed_precision: str,
                 adapters: memory_estimate.ParamStats | None = None) -> memory_estimate.TrainingSetup:
    return memory_estimate.TrainingSetup(
        lora=args.use_lora, optimizer=chosen_name(args.optimizer_type, args.optimizer, args.use_8bit_adam),
        full_bf16=args.full_bf16, fused_backward_pass=args.fused_backward_pass,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision, ema=args.use_ema,
        offload_ema=args.offload_ema, adapters=adapters, base_precision=base_precision(args).denoiser)


def model_source(args: argparse.Namespace, weight_dtype: torch.dtype) -> ModelSource:
    """With --full_bf16 the trained denoiser, and the text encoders unless they are trained fully,
    are read from disk in bf16 (the training precision) instead of fp32 first."""
    bf16 = args.full_bf16
    trains_text_encoders = args.train_text_encoder and not args.use_lora
    precision = base_precision(args)   # --base_precision: read in the training dtype, quantized as read
    return ModelSource(args.pretrained_model_name_or_path, args.revision, args.variant, args.cache_dir,
                       denoiser_dtype=torch.bfloat16 if bf16 else weight_dtype if precision.denoiser else None,
                       text_encoder_dtype=weight_dtype if (bf16 and not trains_text_encoders) or precision.text_encoders
                       else None, denoiser_storage=precision.denoiser)


def base_precision(args: argparse.Namespace) -> BasePrecision:
    return resolve_precision(args.base_precision, args.text_encoder_precision, args.fp8_base, args.fp8_base_unet)


def build_stepper(args: argparse.Namespace, optimizer, seed: int, device: torch.device,
                  num_processes: int = 1) -> OptimizerStepper:
    """`optimizer` is accelerate's wrapper; per-parameter updates use the torch optimizer inside it. On
    the CPU each step's freed temporaries go back to the system after the step (issue 26); on several
    processes the fused hooks average each bucket of gradients before stepping it."""
    fused, full_bf16 = args.fused_backward_pass, args.full_bf16
    if not (fused or full_bf16):
        return OptimizerStepper(optimizer)
    if fused and args.max_grad_norm:
        logger.info("Gradient clipping is off with --fused_backward_pass (no step ever holds all gradients).")
    updater = ParamUpdater(getattr(optimizer, "optimizer", optimizer), seed=seed, stochastic_rounding=full_bf16,
                           release=host_memory.release_freed if device.type == "cpu" else None)
    if fused and num_processes > 1:
        updater = ReducingUpdater(updater, num_processes)
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
