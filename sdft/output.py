"""What a finished run leaves in the output folder: the pipeline or the LoRA file, final validation
images made from what was saved, and the model card; then the optional Hub upload. `finish(run)` is
the one export seam; `run.export` (built with the run) says what it writes."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from huggingface_hub import snapshot_download

from sdft import hub
from sdft.adapter_blocks import role_names
from sdft.adapter_files import KOHYA_WEIGHT_NAME, load_kohya, save_kohya
from sdft.adapters import LoraSpec, add_adapter
from sdft.errors import HubError
from sdft.guards import require_finite_weights
from sdft.lora import save_lora
from sdft.model_spec import stamped
from sdft.noise_schedule import scheduler_with
from sdft.quantization import BasePrecision, quantize_frozen
from sdft.single_file import save_single_file
from sdft.training_run import Run
from sdft.validation import generate, log_images, save_images

logger = logging.getLogger("sdft")


def check_replicas_agree(accelerator: Accelerator, modules: dict[str, torch.nn.Module]) -> None:
    """Every process must end with the same weights; a silent desync would make the saved model
    depend on which rank wrote it."""
    if accelerator.num_processes == 1:
        return
    digest = hashlib.sha256()
    for module in modules.values():
        for param in module.parameters():
            if param.requires_grad:
                digest.update(param.detach().float().cpu().numpy().tobytes())
    digests = gather_object([digest.hexdigest()])
    if len(set(digests)) > 1:
        raise RuntimeError(f"Trained weights differ between processes: {digests}")
    logger.info("Trained weights are identical on all %d processes (sha256 %s)", len(digests), digests[0][:16])


def export_pipeline(family, source, trained: dict[str, torch.nn.Module], output_dir: Path,
                    scheduler_settings: dict | str | None, extra_modules: dict | None = None,
                    dtype: torch.dtype | None = None, load_back: bool = True):
    """The full pipeline: the trained modules written anew, every other component copied file for
    file from the base model, so frozen parts keep their stored precision and nothing frozen is
    loaded into memory (upstream rebuilds the whole pipeline, T5-XXL included, in fp32).
    `scheduler_settings` (sdft.noise_schedule; a bare string is a prediction type) change the
    exported scheduler the way the run trained. Returns
    the saved pipeline, loaded back from `output_dir` (None when `load_back` is off)."""
    written = {**(extra_modules or {}), **trained}
    base = local_base_folder(source)
    if base is None:
        # A weight variant or a model not in the local cache: load and save through diffusers.
        pipeline = family.pipeline_cls.from_pretrained(source.path, **written, revision=source.revision,
                                                       variant=source.variant)
        pipeline.save_pretrained(output_dir)
    else:
        copy_components(base, output_dir, skip=set(written))
        for role, module in written.items():
            module.save_pretrained(output_dir / role)
    if isinstance(scheduler_settings, str):
        scheduler_settings = {"prediction_type": scheduler_settings}
    if scheduler_settings:
        write_scheduler(output_dir, scheduler_settings)
    return family.pipeline_cls.from_pretrained(output_dir, dtype=dtype) if load_back else None


def local_base_folder(source) -> Path | None:
    """The base model's folder on disk (a local path, or the Hub cache's snapshot), when its files
    can be copied as they are."""
    if source.variant is not None:
        return None
    if Path(source.path).is_dir():
        return Path(source.path)
    try:
        return Path(snapshot_download(source.path, revision=source.revision, cache_dir=source.cache_dir,
                                      local_files_only=True))
    except Exception:  # not cached in full, or not a Hub id: fall back to from_pretrained
        return None


def copy_components(base: Path, output_dir: Path, skip: set[str]) -> None:
    """Copy model_index.json and the component folders it lists (nothing else: the base may itself
    be an earlier run's output folder, with checkpoints and logs beside the model)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    index = json.loads((base / "model_index.json").read_text())
    shutil.copyfile(base / "model_index.json", output_dir / "model_index.json")
    for name, value in index.items():
        if name in skip or not isinstance(value, list) or value[0] is None or not (base / name).is_dir():
            continue
        shutil.rmtree(output_dir / name, ignore_errors=True)
        shutil.copytree(base / name, output_dir / name)  # follows the Hub cache's symlinks: real files land here


def write_scheduler(output_dir: Path, settings: dict) -> None:
    """The exported scheduler with `settings`; model_index.json names its class (DDIM when the base's
    cannot rescale its betas)."""
    index_file = output_dir / "model_index.json"
    index = json.loads(index_file.read_text())
    library, class_name = index["scheduler"]
    base = getattr(importlib.import_module(library), class_name).from_pretrained(output_dir, subfolder="scheduler")
    scheduler = scheduler_with(base, settings)
    scheduler.save_pretrained(output_dir / "scheduler")
    if type(scheduler) is not type(base):
        index["scheduler"] = [library, type(scheduler).__name__]
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def export_lora(family, trained: dict[str, torch.nn.Module], output_dir: Path, *, kohya: bool,
                dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None,
                diffusers: bool = True) -> Path:
    """The diffusers/PEFT LoRA file (unless `diffusers` is false: LoHa/LoKr), and with `kohya` the
    kohya/LyCORIS-layout one beside it; both carry `metadata` (sdft.model_spec.training_metadata).
    Returns the first file written."""
    paths = []
    if diffusers:
        paths.append(save_lora(family.pipeline_cls, output_dir, trained, dtype=dtype,
                               key_format=family.lora_key_format, metadata=metadata))
    if kohya:
        paths.append(save_kohya(output_dir, trained, family.kohya_text_encoder_prefixes, dtype=dtype,
                                metadata=metadata))
    return paths[0]


def export_single_file(components: dict[str, torch.nn.Module], output_dir: Path, version: str, dtype: torch.dtype,
                       metadata: dict[str, str] | None = None, vocab_sizes: dict[str, int] | None = None,
                       markers: tuple[str, ...] = ()) -> Path:
    """<output_dir>/<its name>.safetensors in the original layout; `version` is the
    ss_base_model_version (sdft.model_spec), which picks the layout."""
    path = save_single_file(version, components, output_dir / f"{output_dir.name}.safetensors", dtype, metadata,
                            vocab_sizes, markers)
    logger.info("Wrote the single-file checkpoint %s", path)
    return path


def load_saved_lora(family, source, output_dir: Path, dtype: torch.dtype, extra_modules: dict | None = None,
                    lycoris: tuple[LoraSpec, list[str]] | None = None, precision: BasePrecision | None = None):
    """Final images come from the file users get: the base pipeline plus load_lora_weights, or for
    LoHa/LoKr (`lycoris` = the adapter and the trained roles) the same adapters rebuilt on the
    pipeline and filled from the kohya/LyCORIS file. A run on a quantized base quantizes this base
    the same way, before it moves to the accelerator, so the images fit where the run did."""
    pipeline = family.pipeline_cls.from_pretrained(source.path, **(extra_modules or {}), revision=source.revision,
                                                   variant=source.variant, dtype=dtype)
    if precision is not None and precision.any:
        quantize_frozen(family.components(pipeline), family.denoiser_role, precision, dtype)
    if lycoris is None:
        pipeline.load_lora_weights(str(output_dir))
        return pipeline
    spec, roles = lycoris
    modules = {role: getattr(pipeline, role) for role in roles}
    names = role_names(modules, family.kohya_text_encoder_prefixes)
    for role, module in modules.items():
        add_adapter(module, spec, is_denoiser=role == family.denoiser_role, names=names[role])
    load_kohya(output_dir / KOHYA_WEIGHT_NAME, modules, family.kohya_text_encoder_prefixes)
    return pipeline


def final_images(accelerator: Accelerator, pipeline, plan, output_dir: Path, step: int) -> list[tuple[str, str]]:
    """Generate the validation prompts with the saved model; returns (relative path, prompt) pairs."""
    images = generate(pipeline.to(accelerator.device), plan, accelerator.device, accelerator.autocast)
    paths = save_images(images, plan.texts, output_dir / "validation" / "final")
    log_images(accelerator.trackers, images, plan.texts, "test", step)
    return [(str(p.relative_to(output_dir)), prompt) for p, prompt in zip(paths, plan.texts)]


# --------------------------------------------------------------------------- the export seam


def finish(run: Run) -> None:
    """Everything a finished run leaves, as `run.export` planned it: the replicas check, then (main
    process) the diffusers folder or LoRA files, the kohya copy, the single file, the embeddings,
    the final images and the model card; then the Hub upload."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    new_tokens = run.token_embeddings
    sharding = run.sharding
    with run.eval_weights.swapped_in():   # schedule-free: the averaged weights are the model
        if sharding is None or not sharding.sharded:   # shards differ by design; the gather below is the check
            check_replicas_agree(accelerator, {**run.trained.modules,
                                               **(new_tokens.modules() if new_tokens else {})})
        require_finite_weights(run.trained.modules, f"the model to {run.output_dir}", accelerator)
        with full_modules(sharding, run.trained.modules) as modules:   # every process enters the gather
            if accelerator.is_main_process:
                save_outputs(run, modules)
        accelerator.wait_for_everyone()
    accelerator.end_training()
    plan = run.export
    if plan.hub_repo is not None and accelerator.is_main_process:
        if not hub.upload_output(run.output_dir, plan.hub_repo, plan.hub_token):
            raise HubError(f"Training finished and {run.output_dir} is complete, but the upload failed.")


def full_modules(sharding, modules: dict[str, torch.nn.Module]):
    return nullcontext(modules) if sharding is None else sharding.full_modules(modules)


def save_outputs(run: Run, modules: dict[str, torch.nn.Module]) -> None:
    """`modules`: the trained modules with their full weights (gathered from the shards when sharded)."""
    family, output_dir, trained, plan = run.family, run.output_dir, run.trained, run.export
    if trained.ema is not None:
        trained.ema.copy_to(modules)   # the denoiser and any fully trained text encoder
    extra = family.export_modules(run.models, run.source)
    new_tokens = run.token_embeddings
    embeddings_file = new_tokens.export(output_dir) if new_tokens is not None else None
    if new_tokens is not None and not plan.lora:
        extra.update(new_tokens.export_modules(run.source))   # from_pretrained alone knows the tokens
    if plan.lora:
        export_lora(family, modules, output_dir, kohya=plan.kohya_lora, dtype=plan.lora_dtype,
                    metadata=stamped(trained.lora_metadata, run.max_train_steps), diffusers=plan.diffusers_lora)
        lycoris = None if plan.diffusers_lora else (plan.adapter, list(modules))
        pipeline = (load_saved_lora(family, run.source, output_dir, run.weight_dtype, extra, lycoris,
                                    plan.base_precision) if run.validation.enabled else None)
        if pipeline is not None and new_tokens is not None:
            new_tokens.load_into(pipeline, embeddings_file)
    else:
        pipeline = export_pipeline(family, run.source, modules, output_dir, plan.scheduler_settings, extra,
                                   dtype=run.weight_dtype, load_back=run.validation.enabled)
        if plan.single_file_dtype is not None:
            save_single_file_output(run, extra)
    samples = []
    if pipeline is not None and run.validation.enabled:
        samples = final_images(run.accelerator, pipeline, run.validation, output_dir, run.max_train_steps)
    pictures = run.pictures.redraw("final" if samples else None, run.max_train_steps)
    summary = run.stats.log_summary()
    hub.write_model_card(output_dir, dataclasses.replace(
        plan.card, validation=samples, pictures=[str(p.relative_to(output_dir)) for p in pictures],
        run_summary=summary or {}, best_val_loss=run.val_loss.best if run.val_loss is not None else None))
    logger.info("Saved the trained model to %s", output_dir)


def save_single_file_output(run: Run, extra: dict) -> Path:
    """--save_single_file: every component as exported (trained ones, the VAE the run used, the
    frozen rest), in the planned precision."""
    family, modules, plan = run.family, run.trained.modules, run.export
    components = {**family.components(run.models), **extra, **modules}
    # Learned tokens (--train_text_encoder_ti) go to UIs as the embeddings file, beside the checkpoint.
    new_tokens = run.token_embeddings
    vocab_sizes = {encoder.role: min(encoder.ids) for encoder in new_tokens.encoders} if new_tokens else None
    return export_single_file(components, run.output_dir, plan.metadata["ss_base_model_version"],
                              plan.single_file_dtype, plan.metadata, vocab_sizes, plan.markers)
