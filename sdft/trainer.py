"""The training run shared by every script.

`train(args, family, make_objective)` is the only function below the scripts that reads the
argparse namespace: it turns flags into plain objects (data, models, objective, optimizer,
checkpointer, validation plan) and hands them to `run_epochs`, whose step reads like the maths:

    latents = family.encode_images(...)
    cond    = family.condition(...)
    noised  = objective.noise(latents, generator)
    pred    = family.predict(denoiser, noised.noisy, noised.timesteps, cond)
    loss    = objective.loss(pred, noised).mean()

Randomness inside a step comes from a generator derived from (seed, micro-step, process), and the
data order from (seed, epoch), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import random
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from tqdm.auto import tqdm

from sdft import hub
from sdft.checkpointing import Checkpointer, Position, TrainedWeights, read_position, resolve_resume
from sdft.builders import (build_optimizer, build_stepper, cache_settings, check_memory, ddpm_objective,
                           model_source, text_image_data, token_embeddings, token_plan, tracker_config,
                           validation_seed)
from sdft.cli import CliError
from sdft.data.dataset import EpochShuffleSampler, loader_order
from sdft.data.caches import CacheSettings, fill_caches
from sdft.data.latent_cache import sample_from_moments, sample_latents
from sdft.data.sources import DataError
from sdft.data.text_cache import TextCache
from sdft.ema import EMA
from sdft.families.source import ModelSource
from sdft.guards import NonFiniteError, NonFiniteGuard, check_precision_device, require_finite_weights
from sdft.lora import KOHYA_WEIGHT_NAME, WEIGHT_NAME, rank_and_alpha
from sdft.model_spec import describe_base, stamped, training_metadata
from sdft.objectives import latent_mask, split_prior
from sdft.optim import build_lr_scheduler
from sdft.preemption import Interrupted, StopRequest, stop_if_requested
from sdft.output import (check_replicas_agree, export_lora, export_pipeline, export_single_file, final_images,
                         load_saved_lora)
from sdft.plots import Pictures
from sdft.run_stats import RunStats
from sdft.stepping import OptimizerStepper
from sdft.textual_inversion import TokenEmbeddings, check_abstractions_used, stop_step
from sdft.trainable import (LoraSpec, Placement, enable_gradient_checkpointing, param_groups, prepare_models,
                            trainable_params)
from sdft.validation import ValidationPlan, generate, log_images, plan_prompts, save_images
from sdft.validation_loss import ValidationLoss

logger = logging.getLogger("sdft")

USER_ERRORS = (CliError, DataError, hub.HubError, FileNotFoundError, NonFiniteError)


def run(main: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    """Entry-point wrapper: a bad input ends the run with its message instead of a traceback."""
    try:
        main(args)
    except Interrupted as err:
        logger.warning("%s", err)
        print(f"interrupted: {err}", file=sys.stderr)
        return err.exit_code
    except USER_ERRORS as err:
        logger.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- building blocks


@dataclass
class Run:
    """Everything the loop needs, built once by `train`."""

    accelerator: Accelerator
    family: object
    models: object                         # unwrapped, for validation and saving
    train_models: object                   # the same, with trained modules as prepared (DDP-wrapped)
    prepared: list                         # the prepared trained modules, for accumulate()
    denoiser: torch.nn.Module              # prepared denoiser
    objective: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: torch.utils.data.DataLoader
    dataset: torch.utils.data.Dataset
    sampler: EpochShuffleSampler           # or a BucketBatchSampler (--enable_bucket)
    checkpointer: Checkpointer
    trained: TrainedWeights
    seed: int
    max_train_steps: int
    updates_per_epoch: int
    num_epochs: int
    checkpointing_steps: int
    max_grad_norm: float
    weight_dtype: torch.dtype
    validation: ValidationPlan
    validation_epochs: int
    output_dir: Path
    source: ModelSource
    dream_detail_preservation: float | None = None
    params_to_clip: list = field(default_factory=list)
    train_text_encoders: bool = False
    prior_loss_weight: float | None = None
    debug_loss: bool = False
    condition_cache: TextCache | None = None
    offloaded: list[str] = field(default_factory=list)   # frozen roles kept on the CPU between validations
    token_embeddings: TokenEmbeddings | None = None        # --train_text_encoder_ti
    masked_loss: bool = False                            # weight the loss by the batch's masks
    stepper: OptimizerStepper | None = None               # applies the optimizer (after or during backward)
    stats: RunStats = field(default_factory=RunStats.off)  # step timers (main process), see run_stats.py
    pictures: Pictures | None = None                       # loss.png and validation/grid.png (main process)
    guard: NonFiniteGuard | None = None                   # stops (or skips) non-finite steps
    stop: StopRequest | None = None                       # SIGTERM/SIGINT: checkpoint, then exit
    val_loss: ValidationLoss | None = None                # held-out images (--validation_split/_data_dir)


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    output_dir = Path(args.output_dir)
    trackers = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    check_precision_device(accelerator.mixed_precision, accelerator.device)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


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


def step_generator(seed: int, micro_step: int, process_index: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(hash((seed, micro_step, process_index)) & (2**63 - 1))


def weight_dtype_of(accelerator: Accelerator) -> torch.dtype:
    """From the accelerator, not the flag: fp16 set in `accelerate config` counts too (diffusers #6363)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


# --------------------------------------------------------------------------- the run


def train(args: argparse.Namespace, family, make_objective=ddpm_objective, make_data=text_image_data,
          tracker_name: str = "text2image-fine-tune") -> None:
    accelerator = make_accelerator(args)
    check_memory(args, family, accelerator)
    output_dir = Path(args.output_dir)
    resume_dir = resolve_resume(args.resume_from_checkpoint, output_dir)
    if args.resume_from_checkpoint and resume_dir is None:
        logger.info("No checkpoint in %s; starting a new training run.", output_dir)
    seed = resolve_seed(args.seed, read_position(resume_dir) if resume_dir else None)
    set_seed(seed)

    # Data first: a bad dataset should fail before minutes of model loading.
    dataset = make_data(args, seed, accelerator, family)
    plan = token_plan(args)
    if plan is not None:
        check_abstractions_used(plan, [*(dataset.distinct_captions(sys.maxsize) or ()), *validation_prompts(args)])
    repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        repo_id = hub.prepare_repo(args.hub_model_id or output_dir.name, args.hub_token)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    run_state = build_run(args, family, make_objective, accelerator, dataset, seed)
    position = Position(seed=seed)
    if resume_dir is not None:
        logger.info("Resuming from %s", resume_dir)
        position = run_state.checkpointer.load(resume_dir).placed(run_state.updates_per_epoch,
                                                                   args.gradient_accumulation_steps)
        position.seed = seed
    if accelerator.is_main_process:
        accelerator.init_trackers(getattr(args, "tracker_project_name", tracker_name), config=tracker_config(args))
        run_state.pictures = Pictures.attach(accelerator, output_dir)
    run_state.stats = RunStats(accelerator.is_main_process, accelerator.device, accelerator.num_processes)
    log_plan(run_state, len(dataset), args)
    run_state.guard = NonFiniteGuard(accelerator, getattr(args, "skip_nan_steps", 0), position, output_dir,
                                     check_grad_norm=accelerator.scaler is None)
    run_state.stop = StopRequest().install()
    try:
        run_epochs(run_state, position)
        finish(run_state, args, repo_id)
    finally:
        run_state.stop.restore()


def build_run(args: argparse.Namespace, family, make_objective, accelerator: Accelerator, dataset, seed: int) -> Run:
    weight_dtype = weight_dtype_of(accelerator)
    source = model_source(args, weight_dtype)
    trained_dtype = source.denoiser_dtype or torch.float32
    models = load_models(family, source)
    placement = Placement(accelerator.device, weight_dtype, family.vae_dtype(weight_dtype), trained_dtype)
    train_text_encoders = getattr(args, "train_text_encoder", False)
    train_denoiser = getattr(args, "train_unet", True)
    trained, new_tokens = build_trained(args, family, models, placement, seed, train_denoiser, train_text_encoders)
    ema = None
    if getattr(args, "use_ema", False):
        ema = EMA(ema_start(family, source, trained[family.denoiser_role], args), family.denoiser_role,
                  accelerator.device, foreach=getattr(args, "foreach_ema", False),
                  offload=getattr(args, "offload_ema", False))
    objective = make_objective(args, models.noise_scheduler, accelerator.device)
    params = trainable_params(trained) + (new_tokens.params() if new_tokens else [])
    optimizer = build_optimizer(args, param_groups(trained, family.denoiser_role,
                                                   getattr(args, "text_encoder_lr", None),
                                                   getattr(args, "adam_weight_decay_text_encoder", None))
                                + ([{"params": new_tokens.params()}] if new_tokens else []),
                                accelerator.num_processes)
    sampler, order = loader_order(dataset, args.train_batch_size, seed)
    dataloader = accelerator.prepare(torch.utils.data.DataLoader(
        dataset, **order, collate_fn=dataset.collate, num_workers=args.dataloader_num_workers))
    updates_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    if new_tokens is not None:
        new_tokens.stop_step = stop_step(args.train_text_encoder_ti_frac, max_train_steps, train_denoiser)
    lr_scheduler = build_lr_scheduler(args.lr_scheduler, optimizer, warmup_steps=args.lr_warmup_steps,
                                      total_steps=max_train_steps, num_processes=accelerator.num_processes,
                                      num_cycles=args.lr_num_cycles, power=args.lr_power)
    *prepared, optimizer, lr_scheduler = accelerator.prepare(*trained.values(), optimizer, lr_scheduler)
    prepared = dict(zip(trained, prepared))
    stepper = build_stepper(args, optimizer, seed)
    weights = TrainedWeights(family.pipeline_cls, trained, lora=args.use_lora, ema=ema,
                             lora_key_format=family.lora_key_format, extras=[new_tokens] if new_tokens else [],
                             lora_metadata=file_metadata(args, family, models, trained, max_train_steps)
                             if args.use_lora else None)
    condition_cache, offloaded = precompute(family, models, dataset, accelerator,
                                            train_text_encoders or new_tokens is not None,
                                            caches=cache_settings(args), source=source)
    prompts = validation_prompts(args)
    return Run(
        accelerator=accelerator, family=family, models=models,
        train_models=dataclasses.replace(models, **prepared), prepared=list(prepared.values()),
        denoiser=prepared.get(family.denoiser_role, getattr(models, family.denoiser_role)), objective=objective,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler, dataloader=dataloader, dataset=dataset, sampler=sampler,
        checkpointer=Checkpointer(accelerator, Path(args.output_dir), args.checkpoints_total_limit, weights),
        trained=weights, seed=seed, max_train_steps=max_train_steps, updates_per_epoch=updates_per_epoch,
        num_epochs=math.ceil(max_train_steps / updates_per_epoch), checkpointing_steps=args.checkpointing_steps,
        max_grad_norm=0.0 if stepper.fused else args.max_grad_norm, weight_dtype=weight_dtype,
        validation=ValidationPlan(new_tokens.plan.apply_all(prompts) if new_tokens else prompts, seed=seed,
                                  resolution=args.resolution),
        validation_epochs=args.validation_epochs, output_dir=Path(args.output_dir), source=source,
        dream_detail_preservation=args.dream_detail_preservation if getattr(args, "dream_training", False) else None,
        params_to_clip=params, train_text_encoders=train_text_encoders,
        prior_loss_weight=args.prior_loss_weight if getattr(args, "with_prior_preservation", False) else None,
        debug_loss=getattr(args, "debug_loss", False), condition_cache=condition_cache, offloaded=offloaded,
        token_embeddings=new_tokens,
        masked_loss=getattr(args, "masked_loss", False),
        stepper=stepper,
        val_loss=held_out_loss(args, accelerator, dataset, family, objective, weight_dtype, offloaded, seed,
                               caption_map=new_tokens.plan.apply_all if new_tokens else None),
    )


def build_trained(args: argparse.Namespace, family, models, placement: Placement, seed: int, train_denoiser: bool,
                  train_text_encoders: bool) -> tuple[dict, TokenEmbeddings | None]:
    """The modules that train (full or LoRA), and the new token embeddings of --train_text_encoder_ti."""
    roles = ([family.denoiser_role] if train_denoiser else []) + (
        family.trainable_text_encoder_roles if train_text_encoders else [])
    trained = prepare_models(family, models, roles, placement, lora=lora_spec(args, family),
                             gradient_checkpointing=args.gradient_checkpointing,
                             xformers=getattr(args, "enable_xformers_memory_efficient_attention", False),
                             npu_flash_attention=getattr(args, "enable_npu_flash_attention", False))
    new_tokens = token_embeddings(args, family, models, seed)
    if not train_denoiser and args.gradient_checkpointing:
        # Frozen, but the embeddings' gradient still flows back through it.
        enable_gradient_checkpointing(getattr(models, family.denoiser_role), needs_input_grads=False)
    return trained, new_tokens


def held_out_loss(args: argparse.Namespace, accelerator: Accelerator, dataset, family, objective,
                  weight_dtype: torch.dtype, offloaded: list[str], seed: int,
                  caption_map=None) -> ValidationLoss | None:
    held_out = getattr(dataset, "held_out", None)
    if held_out is None:
        return None
    val_loss = ValidationLoss(held_out, args.train_batch_size, validation_seed(args, seed),
                              args.validate_every_n_steps, family, objective, weight_dtype, offloaded, caption_map)
    val_loss.register(accelerator)
    return val_loss


def precompute(family, models, dataset, accelerator: Accelerator, train_text_encoders: bool, *,
               caches: CacheSettings, source: ModelSource,
               caption_limit: int = 64) -> tuple[TextCache | None, list[str]]:
    """Encode what will not change during training once (sdft.data.caches), then park the encoders
    on the CPU."""
    cache, offloaded = fill_caches(family, models, dataset, accelerator, caches, source,
                                   train_text_encoders=train_text_encoders, caption_limit=caption_limit)
    for role in offloaded:
        getattr(models, role).to("cpu")
    return cache, offloaded


def lora_spec(args: argparse.Namespace, family) -> LoraSpec | None:
    if not args.use_lora:
        return None
    return LoraSpec(rank=args.rank, denoiser_targets=family.lora_target_modules,
                    dropout=getattr(args, "lora_dropout", 0.0))


def validation_prompts(args: argparse.Namespace) -> list[str]:
    return plan_prompts(getattr(args, "validation_prompts", None), args.validation_prompt,
                        args.num_validation_images)


def load_models(family, source: ModelSource):
    try:
        return family.load(source)
    except OSError as err:
        raise FileNotFoundError(f"Could not load the model '{source.path}': {err}") from err


def ema_start(family, source: ModelSource, denoiser: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """The EMA starts from --revision; with --non_ema_revision the trained copy came from elsewhere."""
    if getattr(args, "non_ema_revision", None) not in (None, args.revision):
        return family.load_denoiser(source)
    return denoiser


def log_plan(run_state: Run, num_examples: int, args: argparse.Namespace) -> None:
    total_batch = args.train_batch_size * run_state.accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Training *****")
    logger.info("  examples = %d, epochs = %d, batch per device = %d, total batch = %d, accumulation = %d",
                num_examples, run_state.num_epochs, args.train_batch_size, total_batch,
                args.gradient_accumulation_steps)
    logger.info("  optimizer steps = %d, seed = %d, optimizer = %s", run_state.max_train_steps, run_state.seed,
                type(run_state.optimizer.optimizer).__name__)


def run_epochs(run_state: Run, position: Position) -> Position:
    accelerator = run_state.accelerator
    progress = tqdm(total=run_state.max_train_steps, initial=position.global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    if position.global_step >= run_state.max_train_steps:
        logger.info("The checkpoint is at step %d, which already reaches --max_train_steps %d.",
                    position.global_step, run_state.max_train_steps)
    epoch = position.epoch
    while position.global_step < run_state.max_train_steps and epoch < run_state.num_epochs:
        skip = position.batches_in_epoch if epoch == position.epoch else 0
        if skip >= len(run_state.dataloader):
            epoch += 1
            continue
        run_epoch(run_state, position, epoch, skip, progress)
        if run_state.val_loss is not None and run_state.val_loss.due(position.global_step, end_of_epoch=True):
            evaluate_held_out(run_state, position.global_step)
        if run_state.validation.enabled and epoch % run_state.validation_epochs == 0:
            validate(run_state, phase="validation", step=position.global_step, folder=f"epoch-{epoch:04d}")
        epoch += 1
    progress.close()
    return position


def run_epoch(run_state: Run, position: Position, epoch: int, skip: int, progress) -> None:
    accelerator = run_state.accelerator
    run_state.sampler.use_epoch(epoch)
    run_state.dataset.use_epoch(epoch)
    loader = accelerator.skip_first_batches(run_state.dataloader, skip) if skip else run_state.dataloader
    position.epoch, position.batches_in_epoch = epoch, skip
    ga = accelerator.gradient_accumulation_steps
    loss_sum, micro_steps = torch.zeros((), device=accelerator.device), 0
    for batch in run_state.stats.batches(loader):
        micro_step = position.global_step * ga + micro_steps
        with accelerator.accumulate(*run_state.prepared):
            loss, per_sample = training_step(run_state, batch, micro_step)
        if run_state.debug_loss:
            accelerator.log({f"loss/{name}": value for name, value in zip(batch["names"], per_sample.tolist())},
                            step=position.global_step + 1)
        loss_sum += loss.detach()
        micro_steps += 1
        position.batches_in_epoch += 1
        if not accelerator.sync_gradients:
            continue
        # One optimizer step is complete.
        position.global_step += 1
        run_state.stats.end_step()
        mean_loss = accelerator.reduce(loss_sum / micro_steps, reduction="mean").item()
        loss_sum, micro_steps = torch.zeros((), device=accelerator.device), 0
        lr = run_state.lr_scheduler.get_last_lr()[0]
        accelerator.log({"train_loss": mean_loss, "lr": lr, "epoch": epoch}, step=position.global_step)
        progress.update(1)
        progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
        if run_state.val_loss is not None and run_state.val_loss.due(position.global_step, end_of_epoch=False):
            evaluate_held_out(run_state, position.global_step)
        saved = position.global_step % run_state.checkpointing_steps == 0
        if saved:
            run_state.checkpointer.save(position)
        stop_if_requested(run_state.stop, accelerator, run_state.checkpointer, position, saved)
        if position.global_step >= run_state.max_train_steps:
            break


def training_step(run_state: Run, batch: dict, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-step; returns the loss and the per-sample losses (detached)."""
    accelerator, family, models = run_state.accelerator, run_state.family, run_state.train_models
    generator = step_generator(run_state.seed, micro_step, accelerator.process_index, accelerator.device)
    new_tokens = run_state.token_embeddings
    learn_tokens = new_tokens is not None and new_tokens.active(micro_step // accelerator.gradient_accumulation_steps)
    if new_tokens is not None:
        batch = {**batch, "captions": new_tokens.plan.apply_all(batch["captions"])}
    with torch.no_grad():
        if "latent_moments" in batch:
            raw = sample_from_moments(batch["latent_moments"], generator)
        else:
            raw = sample_latents(models.vae, batch["pixel_values"], generator)
        latents = family.scale_latents(models, raw).to(run_state.weight_dtype)
    run_state.stats.lap("vae")
    if run_state.condition_cache is not None:
        cond = family.batch_condition(run_state.condition_cache(batch), batch, accelerator.device)
    else:
        with nullcontext() if run_state.train_text_encoders or learn_tokens else torch.no_grad():
            cond = family.condition(models, batch, accelerator.device)
    run_state.stats.lap("text")
    noised = run_state.objective.noise(latents, generator)
    if run_state.dream_detail_preservation is not None:
        with torch.no_grad():
            guess = family.predict(run_state.denoiser, noised.noisy, noised.timesteps, cond)
        noised = run_state.objective.dream(noised, guess, run_state.dream_detail_preservation)
    pred = family.predict(run_state.denoiser, noised.noisy, noised.timesteps, cond)
    # --masked_loss: the pixel mask, averaged onto the latent grid (class images come with ones).
    mask = None
    if run_state.masked_loss and "masks" in batch:
        mask = latent_mask(batch["masks"].to(latents.device), latents.shape[-2:])
    per_sample = run_state.objective.loss(pred, noised, mask)
    if run_state.prior_loss_weight is not None:
        loss = split_prior(per_sample, run_state.prior_loss_weight)
    else:
        loss = per_sample.mean()
    run_state.stepper.begin(micro_step // accelerator.gradient_accumulation_steps)  # seeds stochastic rounding
    accelerator.backward(loss)
    run_state.stats.lap("denoiser")
    if learn_tokens and accelerator.sync_gradients:
        new_tokens.prepare_gradients(accelerator)
    grad_norm = None
    if accelerator.sync_gradients and run_state.max_grad_norm:
        grad_norm = accelerator.clip_grad_norm_(run_state.params_to_clip, run_state.max_grad_norm)
    update = run_state.guard is None or run_state.guard.allows_step(loss, grad_norm, accelerator.sync_gradients)
    if update:
        run_state.stepper.step()  # optimizer.step() and zero_grad, or nothing when the backward pass did it
    else:
        run_state.optimizer.zero_grad(set_to_none=True)  # a skipped step: drop the non-finite gradients
    run_state.lr_scheduler.step()
    if learn_tokens and accelerator.sync_gradients:
        new_tokens.restore()
    if update and accelerator.sync_gradients and run_state.trained.ema is not None:
        run_state.trained.ema.step(run_state.trained.modules[family.denoiser_role].parameters())
    run_state.stats.lap("optimizer")
    return loss, per_sample.detach()


# --------------------------------------------------------------------------- validation and output


def evaluate_held_out(run_state: Run, step: int) -> None:
    role = run_state.family.denoiser_role
    # The unwrapped denoiser, trained or (textual inversion alone) frozen.
    denoiser = run_state.trained.modules.get(role) or getattr(run_state.models, role)
    run_state.val_loss.evaluate(run_state.accelerator, run_state.models, denoiser, step)


def validation_pipeline(run_state: Run):
    """A pipeline around the in-memory modules (nothing reloaded from disk but configs)."""
    family, source = run_state.family, run_state.source
    pipeline = family.pipeline_cls.from_pretrained(
        source.path, **{**family.pipeline_modules(run_state.models), **run_state.trained.modules},
        revision=source.revision, variant=source.variant, dtype=run_state.weight_dtype,
    )
    # --prediction_type may differ from the base model's scheduler; sample the way the model was trained
    # (the exported scheduler gets the same value in output.export_pipeline).
    trained_type = getattr(run_state.objective, "prediction_type", None)
    if trained_type not in (None, pipeline.scheduler.config.get("prediction_type", trained_type)):
        pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config, prediction_type=trained_type)
    return pipeline.to(run_state.accelerator.device)


def validate(run_state: Run, phase: str, step: int, folder: str) -> list[Path]:
    """Main process only; the others wait at the barrier."""
    accelerator = run_state.accelerator
    paths = []
    if accelerator.is_main_process:
        logger.info("Generating %d validation image(s)", len(run_state.validation.prompts))
        ema = run_state.trained.ema
        with ema.swapped_in(run_state.trained.modules[run_state.family.denoiser_role]) if ema is not None \
                else nullcontext():
            pipeline = validation_pipeline(run_state)
            images = generate(pipeline, run_state.validation, accelerator.device, accelerator.autocast)
        del pipeline
        for role in run_state.offloaded:
            getattr(run_state.models, role).to("cpu")
        paths = save_images(images, run_state.validation.prompts, run_state.output_dir / "validation" / folder)
        run_state.pictures.redraw(folder, step)
        log_images(accelerator.trackers, images, run_state.validation.prompts, phase, step)
    accelerator.wait_for_everyone()
    return paths


def finish(run_state: Run, args: argparse.Namespace, repo_id: str | None) -> None:
    accelerator = run_state.accelerator
    accelerator.wait_for_everyone()
    new_tokens = run_state.token_embeddings
    check_replicas_agree(accelerator, {**run_state.trained.modules, **(new_tokens.modules() if new_tokens else {})})
    require_finite_weights(run_state.trained.modules, f"the model to {run_state.output_dir}")  # on every process
    if accelerator.is_main_process:
        save_outputs(run_state, args)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if repo_id is not None and accelerator.is_main_process:
        if not hub.upload_output(run_state.output_dir, repo_id, args.hub_token):
            raise hub.HubError(f"Training finished and {run_state.output_dir} is complete, but the upload failed.")


def save_outputs(run_state: Run, args: argparse.Namespace) -> None:
    family, output_dir, trained = run_state.family, run_state.output_dir, run_state.trained
    if trained.ema is not None:
        trained.ema.copy_to(trained.modules[family.denoiser_role].parameters())
    extra = family.export_modules(run_state.models)
    new_tokens = run_state.token_embeddings
    embeddings_file = new_tokens.export(output_dir) if new_tokens is not None else None
    if new_tokens is not None and not trained.lora:
        extra.update(new_tokens.export_modules(run_state.source))   # from_pretrained alone knows the tokens
    if trained.lora:
        upcast = getattr(args, "upcast_before_saving", True)
        export_lora(family, trained.modules, output_dir, kohya=getattr(args, "output_kohya_format", False),
                    dtype=None if upcast else run_state.weight_dtype,
                    metadata=stamped(trained.lora_metadata, run_state.max_train_steps))
        pipeline = (load_saved_lora(family, run_state.source, output_dir, run_state.weight_dtype, extra)
                    if run_state.validation.enabled else None)
        if pipeline is not None and new_tokens is not None:
            new_tokens.load_into(pipeline, embeddings_file)
    else:
        pipeline = export_pipeline(family, run_state.source, trained.modules, output_dir,
                                   getattr(args, "prediction_type", None), extra, dtype=run_state.weight_dtype,
                                   load_back=run_state.validation.enabled)
        if args.save_single_file:
            save_single_file_output(run_state, args, extra)
    samples = []
    if pipeline is not None and run_state.validation.enabled:
        samples = final_images(run_state.accelerator, pipeline, run_state.validation, output_dir,
                               run_state.max_train_steps)
    pictures = run_state.pictures.redraw("final" if samples else None, run_state.max_train_steps)
    summary = run_state.stats.log_summary()
    hub.write_model_card(output_dir, card_info(run_state, args, samples, pictures, summary))
    logger.info("Saved the trained model to %s", output_dir)


SAVE_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def save_single_file_output(run_state: Run, args: argparse.Namespace, extra: dict) -> Path:
    """--save_single_file: every component as exported (trained ones, the VAE the run used, the
    frozen rest), in --save_precision or the training precision."""
    family, modules = run_state.family, run_state.trained.modules
    metadata = file_metadata(args, family, run_state.models, modules, run_state.max_train_steps)
    components = {**family.components(run_state.models), **extra, **modules}
    dtype = SAVE_PRECISIONS.get(args.save_precision, run_state.weight_dtype)
    # Learned tokens (--train_text_encoder_ti) go to UIs as the embeddings file, beside the checkpoint.
    new_tokens = run_state.token_embeddings
    vocab_sizes = {encoder.role: min(encoder.ids) for encoder in new_tokens.encoders} if new_tokens else None
    return export_single_file(components, run_state.output_dir, metadata["ss_base_model_version"], dtype, metadata,
                              vocab_sizes)


def file_metadata(args: argparse.Namespace, family, models, trained: dict[str, torch.nn.Module],
                  steps: int) -> dict[str, str]:
    """The ss_*/modelspec.* header of the files users load in UIs (LoRA files, single-file checkpoints)."""
    denoiser = getattr(models, family.denoiser_role)   # trained or not (--train_unet false)
    prediction = getattr(args, "prediction_type", None) or models.noise_scheduler.config.get("prediction_type")
    base = describe_base(family.name, dict(denoiser.config), prediction)
    return training_metadata(base, base_model=args.pretrained_model_name_or_path, title=Path(args.output_dir).name,
                             resolution=args.resolution, steps=steps,
                             lora=rank_and_alpha(trained) if args.use_lora else None)


def card_info(run_state: Run, args: argparse.Namespace, samples: list[tuple[str, str]],
              pictures: list[Path] = (), summary: dict | None = None) -> hub.CardInfo:
    family, new_tokens = run_state.family, run_state.token_embeddings
    instance_prompt = getattr(args, "instance_prompt", None)
    embeddings = None
    if new_tokens is not None:
        instance_prompt = new_tokens.plan.apply(instance_prompt) if instance_prompt else None
        embeddings = hub.EmbeddingsInfo(
            file=f"{run_state.output_dir.name}_emb.safetensors", tokens=new_tokens.plan.tokens,
            triggers=new_tokens.plan.triggers(), in_pipeline=not args.use_lora,
            encoders=[(e.key, e.role, e.tokenizer_role) for e in new_tokens.encoders])
    return hub.CardInfo(
        base_model=args.pretrained_model_name_or_path, title=Path(args.output_dir).name, license=family.license,
        tags=family.tags, lora=args.use_lora, pipeline_class=family.pipeline_cls.__name__,
        dataset=getattr(args, "dataset_name", None), instance_prompt=instance_prompt, embeddings=embeddings,
        validation=samples, best_val_loss=run_state.val_loss.best if run_state.val_loss is not None else None,
        pictures=[str(p.relative_to(run_state.output_dir)) for p in pictures],
        run_summary=summary or {},
        training={"steps": run_state.max_train_steps, "learning rate": args.learning_rate,
                  "batch size per device": args.train_batch_size, "resolution": args.resolution,
                  "mixed precision": run_state.accelerator.mixed_precision,
                  **({"LoRA rank": args.rank} if args.use_lora else {}),
                  **({"EMA": "yes"} if run_state.trained.ema is not None else {})},
        ui_files=ui_files(run_state, args),
    )


def ui_files(run_state: Run, args: argparse.Namespace) -> dict[str, str]:
    """The files of the output folder that ComfyUI, A1111 and Forge load, for the model card."""
    files = {}
    if args.use_lora and getattr(args, "output_kohya_format", False):
        files[KOHYA_WEIGHT_NAME] = "lora"
    elif args.use_lora and run_state.family.name == "sd3":
        files[WEIGHT_NAME] = "lora"
    elif not args.use_lora and args.save_single_file:
        files[f"{run_state.output_dir.name}.safetensors"] = "checkpoint"
    if run_state.token_embeddings is not None:
        files[f"{run_state.output_dir.name}_emb.safetensors"] = "embedding"
    return files
