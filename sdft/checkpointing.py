"""Resumable checkpoints: `checkpoint-N/` folders in the output folder.

A checkpoint holds the trained weights in diffusers format (`unet/`, `unet_ema/`, or
`pytorch_lora_weights.safetensors`), accelerate's optimizer, LR-scheduler, grad-scaler and RNG
states, and `training_state.json` with the global step, the epoch, how many batches of that epoch
were consumed and the data seed. With the data order a function of (seed, epoch), that is enough
for a resumed run to continue exactly where the interrupted one stopped.

Saving is atomic and durable: everything is written to a hidden `.checkpoint-N.partial` folder,
a `manifest.json` listing every file and its size is added, every file and folder is fsynced, and
only then is the folder renamed (and its parent fsynced). A crash during a save, of the process or
of the machine, never leaves a half-written `checkpoint-N` that `--resume_from_checkpoint latest`
would pick, and never touches older checkpoints. `latest` also skips, with a warning, any
checkpoint whose files do not match its manifest (a disk that lied about a flush, a copy cut
short); a checkpoint without a manifest (written by the diffusers scripts or an older sdft) is
trusted as before. Old checkpoints are rotated out only after the new one is in place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from sdft.adapter_files import KOHYA_WEIGHT_NAME, load_kohya, save_kohya
from sdft.ema import EMA
from sdft.errors import MissingFileError
from sdft.guards import require_finite_weights
from sdft.lora import load_lora, save_lora
from sdft.model_spec import stamped
from sdft.optim import EvalWeights

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
MANIFEST_FILE = "manifest.json"


@dataclass
class Position:
    global_step: int = 0
    epoch: int = 0                # -1: unknown (a diffusers checkpoint); derived from the step on resume
    batches_in_epoch: int = 0     # dataloader batches of `epoch` already consumed (per process)
    seed: int | None = None
    skipped_steps: int = 0        # updates skipped for a non-finite loss (--skip_nan_steps)

    def placed(self, updates_per_epoch: int, accumulation: int) -> "Position":
        """A position whose epoch is known: diffusers checkpoints only record the step, so the epoch
        and the batches consumed are derived from it (exact when nothing else changed)."""
        if self.epoch >= 0:
            return self
        epoch, updates = divmod(self.global_step, updates_per_epoch)
        return Position(self.global_step, epoch, updates * accumulation, self.seed, self.skipped_steps)


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first; stray files and partial saves are ignored."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = CHECKPOINT_NAME.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def resolve_resume(value: str | None, output_dir: str | Path) -> Path | None:
    """'latest' -> the newest checkpoint in output_dir, or None; a bare name (`checkpoint-1500`) ->
    that folder in output_dir (or, failing that, the current folder); a path -> that path. A path
    that does not exist is an error, never silently swapped for another folder of the same name."""
    if value is None:
        return None
    if value == "latest":
        return latest_complete(output_dir)
    given = Path(value).expanduser()
    candidates = [Path(output_dir) / value, given] if given.name == value else [given]
    for candidate in candidates:
        if candidate.is_dir():
            problems = incomplete_files(candidate)
            if problems:
                raise MissingFileError(f"--resume_from_checkpoint '{value}': {candidate} is incomplete "
                                        f"({'; '.join(problems[:3])}).")
            return candidate
    looked = " or ".join(str(c) for c in candidates)
    raise MissingFileError(f"--resume_from_checkpoint '{value}' does not exist (looked for {looked}).")


def latest_complete(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that passes the manifest check; skipped ones are named in a warning."""
    for _, path in reversed(list_checkpoints(output_dir)):
        problems = incomplete_files(path)
        if not problems:
            return path
        logger.warning("Skipping the incomplete checkpoint %s: %s", path, "; ".join(problems[:3]))
    return None


def incomplete_files(checkpoint: Path) -> list[str]:
    """What differs from the checkpoint's manifest (missing files, wrong sizes); [] when it matches
    or when there is no manifest (a diffusers checkpoint is trusted as it is)."""
    manifest = checkpoint / MANIFEST_FILE
    if not manifest.is_file():
        return []
    try:
        expected = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, UnicodeDecodeError) as err:
        return [f"unreadable {MANIFEST_FILE}: {err}"]
    problems = []
    for name, size in expected.items():
        path = checkpoint / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, not {size}")
    return problems


def write_manifest(folder: Path) -> None:
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1))


def fsync_tree(folder: Path) -> None:
    """Flush every file, then every folder (deepest first, so entries are durable before their parent)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            _fsync(path, os.O_RDONLY)
    for path in sorted([p for p in folder.rglob("*") if p.is_dir()] + [folder], key=lambda p: -len(p.parts)):
        _fsync(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: Path, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:  # folders cannot be opened on Windows; their entries are flushed with the files there
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def read_position(checkpoint: Path) -> Position:
    state_file = checkpoint / STATE_FILE
    if state_file.is_file():
        return Position(**json.loads(state_file.read_text()))
    # A checkpoint written by the diffusers example scripts: only the folder name tells the step.
    match = CHECKPOINT_NAME.match(checkpoint.name)
    if not match:
        raise ValueError(f"{checkpoint} has no {STATE_FILE} and its name is not checkpoint-<step>.")
    return Position(global_step=int(match.group(1)), epoch=-1)


def rotate(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete the oldest checkpoints so that `keep` remain."""
    found = list_checkpoints(output_dir)
    removed = [path for _, path in found[: max(0, len(found) - keep)]]
    for path in removed:
        shutil.rmtree(path)
    if removed:
        logger.info("Removed old checkpoints: %s", ", ".join(p.name for p in removed))
    return removed


@dataclass
class TrainedWeights:
    """What training changes, by role, and how it is written in diffusers format."""

    pipeline_cls: type
    modules: dict[str, torch.nn.Module]     # role -> unwrapped model
    lora: bool
    ema: EMA | None = None
    lora_key_format: str = "diffusers"
    extras: list = field(default_factory=list)  # more state with save(dir)/load(dir), e.g. learned token embeddings
    lora_metadata: dict[str, str] | None = None    # sdft.model_spec keys, written into every LoRA file
    # LoHa/LoKr, which diffusers' LoRA files cannot hold: checkpoints in the kohya/LyCORIS layout,
    # with these text-encoder prefixes (sdft.adapter_files).
    kohya_prefixes: dict[str, str] | None = None
    # FSDP2 / DeepSpeed: accelerate's save_state writes the (sharded) modules with the optimizer, and
    # load_state reads them back; the diffusers-format copy is left to the export (sdft.sharding).
    engine_saves_models: bool = False

    def save(self, directory: Path, step: int | None = None) -> None:
        if not self.engine_saves_models:
            self._save_modules(directory, step)
        if self.ema is not None:
            self.ema.save(directory)
        for extra in self.extras:
            extra.save(directory)

    def _save_modules(self, directory: Path, step: int | None) -> None:
        if self.lora:
            metadata = self.lora_metadata
            if metadata and step is not None:
                metadata = stamped(metadata, step)
            if self.kohya_prefixes is not None:
                save_kohya(directory, self.modules, self.kohya_prefixes, metadata=metadata)
            else:
                save_lora(self.pipeline_cls, directory, self.modules, key_format=self.lora_key_format,
                          metadata=metadata)
        else:
            for role, module in self.modules.items():
                module.save_pretrained(directory / role)

    def load(self, directory: Path) -> None:
        if not self.engine_saves_models:
            self._load_modules(directory)
        if self.ema is not None:
            self.ema.load(directory)
        for extra in self.extras:
            extra.load(directory)

    def _load_modules(self, directory: Path) -> None:
        if self.lora and self.kohya_prefixes is not None:
            load_kohya(directory / KOHYA_WEIGHT_NAME, self.modules, self.kohya_prefixes)
        elif self.lora:
            load_lora(self.pipeline_cls, directory, self.modules)
        else:
            for role, module in self.modules.items():
                saved = type(module).from_pretrained(directory / role, **_dtype_kwarg(module))
                module.load_state_dict(saved.state_dict())
                del saved


def _dtype_kwarg(module: torch.nn.Module) -> dict:
    # diffusers 0.42 renamed torch_dtype to dtype; transformers 5 takes dtype as well.
    return {"dtype": next(module.parameters()).dtype}


def _keep_weights_out_of_accelerate_state(models, weights, output_dir) -> None:
    # The diffusers-format copy written by TrainedWeights is the only copy of the weights.
    weights.clear()


def _load_weights_ourselves(models, input_dir) -> None:
    models.clear()


class Checkpointer:
    def __init__(self, accelerator: Accelerator, output_dir: str | Path, total_limit: int | None,
                 weights: TrainedWeights, eval_weights: EvalWeights | None = None, writer: bool | None = None):
        self.accelerator = accelerator
        # The process that finalizes the folder: the main one, or each machine's first when the
        # machines do not share the output folder (sdft.nodes).
        self.writer = accelerator.is_main_process if writer is None else writer
        # Schedule-free: a checkpoint holds the evaluation weights (what a user takes from it) and the
        # optimizer state in eval mode; loading switches back to the training point (sdft.optim.EvalWeights).
        self.eval_weights = eval_weights or EvalWeights.none()
        self.output_dir = Path(output_dir)
        self.total_limit = total_limit
        self.weights = weights
        accelerator.register_save_state_pre_hook(_keep_weights_out_of_accelerate_state)
        accelerator.register_load_state_pre_hook(_load_weights_ourselves)

    def save(self, position: Position) -> Path:
        """Called on every process: each one writes its own RNG state."""
        with self.eval_weights.swapped_in():
            return self._save(position)

    def _save(self, position: Position) -> Path:
        final = self.output_dir / f"checkpoint-{position.global_step}"
        partial = self.output_dir / f".{final.name}.partial"
        if self.writer and partial.exists():
            shutil.rmtree(partial)  # left over from a crash during an earlier save
        require_finite_weights(self.weights.modules, final.name, self.accelerator)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial))
        if self.writer:
            self.weights.save(partial, step=position.global_step)
            (partial / STATE_FILE).write_text(json.dumps(asdict(position), indent=2))
        self.accelerator.wait_for_everyone()
        if self.writer:
            write_manifest(partial)
            fsync_tree(partial)
            _replace_dir(partial, final)
            _fsync(self.output_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            if self.total_limit is not None:
                rotate(self.output_dir, self.total_limit)
            logger.info("Saved %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def load(self, checkpoint: Path) -> Position:
        self.accelerator.load_state(str(checkpoint))
        self.weights.load(checkpoint)
        self.eval_weights.resume()
        return read_position(checkpoint)


def _replace_dir(source: Path, target: Path) -> None:
    if target.exists():
        # Saving the same step twice (e.g. after resuming from it): swap, then drop the old copy.
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old)
    else:
        os.replace(source, target)
