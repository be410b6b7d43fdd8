"""The training loop shared by every script: `train(run)` runs the epochs of a `Run` built by
`sdft.builders.build`, with in-run validation, held-out loss and checkpoints. It reads no flag.
Each step reads like the maths:

    latents = family.encode_images(...)
    cond    = family.condition(...)
    noised  = objective.noise(latents, generator)
    pred    = family.predict(denoiser, noised.noisy, noised.timesteps, cond)
    loss    = objective.loss(pred, noised).mean()

Randomness inside a step comes from a generator derived from (seed, micro-step, process), and the
data order from (seed, epoch), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdft.checkpointing import Position
from sdft.data.latent_cache import sample_from_moments, sample_latents
from sdft.objectives import latent_mask, split_prior
from sdft.preemption import stop_if_requested
from sdft.training_run import Run
from sdft.validation import generate, log_images, save_images

logger = logging.getLogger("sdft")


def train(run: Run) -> Position:
    """The loop, from `run.position` to `run.max_train_steps`."""
    return run_epochs(run, run.position)


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
        rates = group_rates(run_state.optimizer, run_state.lr_scheduler)
        accelerator.log({"train_loss": mean_loss, "lr": lr, "epoch": epoch, **rates}, step=position.global_step)
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


def group_rates(optimizer, lr_scheduler) -> dict[str, float]:
    """`lr/<group name>` for each parameter group when there are several (sdft.trainable.param_groups)."""
    groups = optimizer.param_groups
    if len(groups) < 2:
        return {}
    return {f"lr/{group.get('name', index)}": rate for index, (group, rate) in
            enumerate(zip(groups, lr_scheduler.get_last_lr()))}


def step_generator(seed: int, micro_step: int, process_index: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(hash((seed, micro_step, process_index)) & (2**63 - 1))


# --------------------------------------------------------------------------- validation


def evaluate_held_out(run_state: Run, step: int) -> None:
    role = run_state.family.denoiser_role
    # The unwrapped denoiser, trained or (textual inversion alone) frozen.
    denoiser = run_state.trained.modules.get(role) or getattr(run_state.models, role)
    with run_state.eval_weights.swapped_in():   # on every process: the swap changes the weights of all
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
    """Images from the evaluation weights (schedule-free) or the EMA; main process only, the others
    wait at the barrier (every process swaps, so replicas stay identical)."""
    with run_state.eval_weights.swapped_in():
        return validate_images(run_state, phase, step, folder)


def validate_images(run_state: Run, phase: str, step: int, folder: str) -> list[Path]:
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
