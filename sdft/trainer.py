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
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdft.checkpointing import Position
from sdft.data.latent_cache import sample_from_moments, sample_latents
from sdft.noise_schedule import scheduler_with
from sdft.objectives import latent_mask, split_prior
from sdft.preemption import stop_if_requested
from sdft.sharding import plain_tensor
from sdft.training_run import Run
from sdft.validation import generate_shared, log_images, sample_rows, save_rows

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
    if run_state.cadence.at_start(position.global_step):
        sample_set(run_state, phase="validation", step=0, folder="step-000000")
    while position.global_step < run_state.max_train_steps and epoch < run_state.num_epochs:
        skip = position.batches_in_epoch if epoch == position.epoch else 0
        if skip >= len(run_state.dataloader):
            epoch += 1
            continue
        run_epoch(run_state, position, epoch, skip, progress)
        if run_state.val_loss is not None and run_state.val_loss.due(position.global_step, end_of_epoch=True):
            evaluate_held_out(run_state, position.global_step)
        if run_state.cadence.after_epoch(epoch):
            sample_set(run_state, phase="validation", step=position.global_step, folder=f"epoch-{epoch:04d}")
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
        if run_state.cadence.after_step(position.global_step):
            sample_set(run_state, phase="validation", step=position.global_step,
                       folder=f"step-{position.global_step:06d}")
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
        with nullcontext() if text_encoders_learn(run_state, micro_step) or learn_tokens else torch.no_grad():
            cond = family.condition(models, batch, accelerator.device)
    run_state.stats.lap("text")
    noised = run_state.objective.noise(latents, generator)
    cond = family.training_condition(models, cond, noised.noisy, generator)
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
    loss = reduce_loss(per_sample, batch, run_state.prior_loss_weight)
    run_state.stepper.begin(micro_step // accelerator.gradient_accumulation_steps)  # seeds stochastic rounding
    accelerator.backward(loss)
    run_state.stats.lap("denoiser")
    if learn_tokens and accelerator.sync_gradients:
        new_tokens.prepare_gradients(accelerator)
    grad_norm = None
    if accelerator.sync_gradients and run_state.max_grad_norm:
        grad_norm = plain_tensor(accelerator.clip_grad_norm_(run_state.params_to_clip, run_state.max_grad_norm))
    update = run_state.guard is None or run_state.guard.allows_step(loss, grad_norm, accelerator.sync_gradients)
    if update:
        run_state.stepper.step()  # optimizer.step() and zero_grad, or nothing when the backward pass did it
    else:
        run_state.optimizer.zero_grad(set_to_none=True)  # a skipped step: drop the non-finite gradients
    run_state.lr_scheduler.step()
    if learn_tokens and accelerator.sync_gradients:
        new_tokens.restore()
    if update and accelerator.sync_gradients and run_state.trained.ema is not None:
        run_state.trained.ema.step(run_state.trained.modules)
    run_state.stats.lap("optimizer")
    return loss, per_sample.detach()


def reduce_loss(per_sample: torch.Tensor, batch: dict, prior_loss_weight: float | None) -> torch.Tensor:
    """The batch's loss: weighted per sample when the batch says so (regularisation subsets of a
    --dataset_config, kohya's prior_loss_weight per item), DreamBooth's [instance; class] halves, or the mean."""
    if "loss_weights" in batch:
        return (per_sample * batch["loss_weights"].to(per_sample.device, per_sample.dtype)).mean()
    if prior_loss_weight is not None:
        return split_prior(per_sample, prior_loss_weight)
    return per_sample.mean()


def text_encoders_learn(run_state: Run, micro_step: int) -> bool:
    """--train_text_encoder, until --train_text_encoder_frac's stop step: after it the encoders run
    without gradients, so the optimizer (which skips parameters without a gradient) leaves them."""
    stop = run_state.text_encoder_stop_step
    step = micro_step // run_state.accelerator.gradient_accumulation_steps
    return run_state.train_text_encoders and (stop is None or step < stop)


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
    # --prediction_type / --zero_terminal_snr may differ from the base model's scheduler; sample the way
    # the model was trained (the exported scheduler gets the same settings in output.export_pipeline).
    pipeline.scheduler = scheduler_with(pipeline.scheduler, run_state.scheduler_settings)
    return pipeline.to(run_state.accelerator.device)


def sample_set(run_state: Run, phase: str, step: int, folder: str) -> list[Path]:
    """A sample set from the evaluation weights (schedule-free; every process swaps, so replicas stay
    identical). One set per step: a step that ends an epoch and meets the step cadence samples once."""
    plan = run_state.validation
    if not plan.enabled or step in run_state.sampled_steps:
        return []
    run_state.sampled_steps.add(step)
    with run_state.eval_weights.swapped_in():
        return sample_set_images(run_state, phase, step, folder)


def sample_set_images(run_state: Run, phase: str, step: int, folder: str) -> list[Path]:
    """Every process generates its share of the prompts (sdft.validation.generate_shared): with the
    EMA weights and the raw ones when EMA is on. The main process writes the set and redraws the grid."""
    plan = run_state.validation
    started = time.perf_counter()
    accelerator = run_state.accelerator
    logger.info("Generating %d sample image(s) at step %d on %d process(es)", len(plan.prompts), step,
                accelerator.num_processes)
    variants = {}
    ema = run_state.trained.ema
    if ema is not None:
        with ema.swapped_in(run_state.trained.modules):
            variants["ema"], _ = sample_with(run_state)
    variants["raw"], makers = sample_with(run_state)
    paths = []
    if accelerator.is_main_process:
        rows = sample_rows(plan.texts, variants)
        paths = save_rows(rows, run_state.output_dir / "validation" / folder, makers)
        run_state.pictures.redraw(folder, step)
        for position, (name, images) in enumerate(variants.items()):
            log_images(accelerator.trackers, images, plan.texts, phase if position == 0 else f"{phase}_{name}", step)
    run_state.stats.sampled(time.perf_counter() - started)
    return paths


def sample_with(run_state: Run) -> tuple[list, list[int]]:
    """The set's images with the denoiser's current weights, shared across processes."""
    pipeline = validation_pipeline(run_state)
    images, makers = generate_shared(pipeline, run_state.validation, run_state.accelerator)
    del pipeline
    for role in run_state.offloaded:
        getattr(run_state.models, role).to("cpu")
    return images, makers
