"""Sharded training through accelerate: FSDP2 (`torch.distributed.fsdp.fully_shard`) and DeepSpeed ZeRO.

Users configure the engine the way accelerate users do (`accelerate config`, or `accelerate launch
--use_fsdp --fsdp_version 2 ...` / `--use_deepspeed --zero_stage N`); accelerate hands the choice to
the processes in `ACCELERATE_*`/`FSDP_*` environment variables, which `EngineConfig` reads so the
parse-time checks can refuse what a sharded run cannot do before any model loads.

What sdft adds around accelerate:
- FSDP2 on CPU processes (gloo): accelerate 1.15 turns FSDP on only for GPU-type backends and
  silently runs DDP on `MULTI_CPU`; `enable_cpu_fsdp` switches the same accelerate FSDP2 code path
  on there, so what runs on GPUs is what the CPU tests run.
- Auto wrapping by the denoiser's block class: without a wrap policy, every class the model lists
  in `_no_split_modules` (diffusers: `BasicTransformerBlock`, `ResnetBlock2D`, `JointTransformerBlock`)
  becomes its own FSDP unit, so no rank ever gathers more than one block beyond its shard.
- Exports gathered from the shards: `Sharding.full_modules` gathers each trained module's full
  state dict onto the main process's CPU (accelerate's `get_state_dict`: parameter by parameter for
  FSDP2, ZeRO-3's consolidated 16-bit weights for DeepSpeed) and loads it into a replica built on the
  meta device, so one rank holds at most its shard plus one full copy of one module. Every rank
  enters the gather (a save on the main process alone would hang in the collectives).
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch

logger = logging.getLogger("sdft")

DDP, FSDP, DEEPSPEED = "ddp", "fsdp", "deepspeed"
TRANSFORMER_WRAP = "TRANSFORMER_BASED_WRAP"


def _on(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "false").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class EngineConfig:
    """The engine accelerate was asked for, read from the environment it sets for the processes."""

    engine: str = DDP                   # ddp (or one process), fsdp, deepspeed
    fsdp_version: int | None = None
    state_dict_type: str | None = None  # FSDP: SHARDED_STATE_DICT (default) or FULL_STATE_DICT
    zero_stage: int | None = None       # DeepSpeed ZeRO stage, from --zero_stage or the config file
    deepspeed_config: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "EngineConfig":
        environ = os.environ if environ is None else environ
        if _on(environ, "ACCELERATE_USE_DEEPSPEED"):
            config_file = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
            stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
            if config_file:
                stage = zero_stage_of(config_file)
            return cls(DEEPSPEED, zero_stage=int(stage) if stage not in (None, "", "auto") else None,
                       deepspeed_config=config_file)
        if _on(environ, "ACCELERATE_USE_FSDP"):
            return cls(FSDP, fsdp_version=int(environ.get("FSDP_VERSION", "1")),
                       state_dict_type=environ.get("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT"))
        return cls()

    @property
    def sharded(self) -> bool:
        return self.engine != DDP

    def describe(self) -> str:
        if self.engine == FSDP:
            return f"FSDP{self.fsdp_version} ({self.state_dict_type})"
        if self.engine == DEEPSPEED:
            return f"DeepSpeed ZeRO-{self.zero_stage if self.zero_stage is not None else '?'}"
        return "DDP"


def zero_stage_of(config_file: str) -> int | None:
    """`zero_optimization.stage` of a DeepSpeed JSON config (None: not set, or "auto")."""
    try:
        config = json.loads(Path(config_file).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"the DeepSpeed config file {config_file} cannot be read: {err}") from err
    stage = config.get("zero_optimization", {}).get("stage")
    return stage if isinstance(stage, int) else None


@dataclass(frozen=True)
class RunShape:
    """What a run trains, as far as the engines care (built from the flags by sdft.checks)."""

    lora: bool = False
    ema: bool = False
    text_encoders: bool = False        # --train_text_encoder / _ti: more than one trained module
    fused_backward: bool = False
    single_file: bool = False
    held_out_loss: bool = False


def refusals(config: EngineConfig, shape: RunShape) -> list[str]:
    """Combinations a sharded run cannot do, each naming the flags (empty: the run may start)."""
    if not config.sharded:
        return []
    engine = config.describe()
    found = []
    if config.engine == FSDP and config.fsdp_version != 2:
        found.append(f"FSDP version {config.fsdp_version} is not supported: use FSDP2 (`accelerate launch "
                     "--use_fsdp --fsdp_version 2`, or fsdp_version: 2 in the accelerate config)")
    if shape.ema:
        found.append(f"--use_ema with {engine} (the EMA copy is not sharded yet: train without --use_ema, "
                     "or with DDP)")
    if shape.text_encoders:
        found.append(f"--train_text_encoder / --train_text_encoder_ti with {engine} (only the denoiser is "
                     "sharded)")
    if shape.fused_backward:
        found.append(f"--fused_backward_pass with {engine} (the engine owns the optimizer step)")
    if shape.single_file:
        found.append(f"--save_single_file with {engine} (export the diffusers folder, then convert it)")
    if shape.held_out_loss:
        found.append(f"--validation_split / --validation_data_dir with {engine} (ranks would run different "
                     "numbers of sharded forward passes)")
    if config.engine == DEEPSPEED and config.zero_stage == 3 and shape.lora:
        found.append("LoRA (--use_lora / --rank) with DeepSpeed ZeRO-3: peft adapters on ZeRO-3-partitioned "
                     "weights are not supported; use ZeRO-2 or FSDP2 for LoRA")
    return found


def enable_cpu_fsdp(accelerator) -> bool:
    """accelerate turns FSDP on for GPU-type backends only; with FSDP requested and CPU processes
    (gloo), switch its FSDP2 path on (both shared states: `Accelerator` reads one, helpers the other).
    Returns whether it did."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU or not _on(os.environ, "ACCELERATE_USE_FSDP"):
        return False
    plugin = FullyShardedDataParallelPlugin()   # from the FSDP_* variables accelerate launch set
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return True


def wrap_by_blocks(accelerator) -> None:
    """Without an auto-wrap policy from the user, FSDP units are the denoiser's block classes (its
    `_no_split_modules`), not the whole model as one unit."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and plugin.auto_wrap_policy is None and not os.environ.get("FSDP_AUTO_WRAP_POLICY"):
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        plugin.auto_wrap_policy = transformer_auto_wrap_policy


def loadable_by_rank0(accelerator, modules: dict[str, torch.nn.Module]) -> None:
    """accelerate's CPU-RAM-efficient loading (rank 0's weights broadcast into the others' empty
    shards) treats every state-dict entry as a sharded parameter, and fails on a persistent buffer
    (SD3's `pos_embed.pos_embed`): such models keep the weights every rank loaded."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or not plugin.cpu_ram_efficient_loading:
        return
    buffers = [f"{role}.{name}" for role, module in modules.items()
               for name, _ in module.named_buffers() if name in module.state_dict()]
    if buffers:
        logger.info("FSDP: CPU-RAM-efficient loading is off (persistent buffers such as %s); every process "
                    "keeps the weights it loaded until they are sharded.", buffers[0])
        plugin.cpu_ram_efficient_loading = False


def fill_deepspeed_batch(accelerator, batch_size: int) -> None:
    """DeepSpeed needs the per-device batch; accelerate takes it from a dataloader prepared in the same
    call as the model, but sdft prepares the dataloader first. An "auto" (or absent) value gets
    --train_batch_size."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size


def engine_of(accelerator) -> str:
    from accelerate.utils import DistributedType

    return {DistributedType.FSDP: FSDP, DistributedType.DEEPSPEED: DEEPSPEED}.get(accelerator.distributed_type, DDP)


def plain_tensor(value):
    """A DTensor (FSDP2's gradient norm) as a plain tensor; anything else as it is."""
    full = getattr(value, "full_tensor", None)
    return full() if callable(full) else value


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (the shard of a DTensor, or the tensor itself)."""
    local = getattr(value, "to_local", None)
    return local() if callable(local) else value


def unsharded_class(module: torch.nn.Module) -> type:
    """FSDP2 swaps a module's class for a generated `FSDP<Name>` subclass; the model class is its base."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    return next(base for base in cls.__mro__ if not issubclass(base, FSDPModule)) if issubclass(cls, FSDPModule) else cls


@dataclass
class Sharding:
    """The engine a run trains with, and the gathers its saves and exports need."""

    accelerator: object
    engine: str = DDP
    prepared: dict[str, torch.nn.Module] = field(default_factory=dict)   # role -> module as prepared
    adapter: object = None     # sdft.adapters.LoraSpec: rebuilt on replicas of LoRA-trained modules

    @property
    def sharded(self) -> bool:
        return self.engine != DDP

    @contextmanager
    def full_modules(self, modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, torch.nn.Module]]:
        """Called on every process. Unsharded: `modules` as they are. Sharded: on the main process,
        replicas holding the gathered full weights (built one role at a time); elsewhere {}."""
        if not self.sharded:
            yield modules
            return
        replicas = {}
        for role, module in modules.items():
            state = self.accelerator.get_state_dict(self.prepared.get(role, module))
            if self.accelerator.is_main_process:
                replicas[role] = self.replica(module, state)
            del state
        try:
            yield replicas
        finally:
            replicas.clear()

    def replica(self, module: torch.nn.Module, state: dict) -> torch.nn.Module:
        """A plain copy of `module` built on the meta device and filled from the gathered `state`."""
        from sdft.adapters import add_adapter

        base = self.accelerator.unwrap_model(module)
        with torch.device("meta"):
            copy = unsharded_class(base).from_config(base.config)
        if getattr(base, "peft_config", None) and self.adapter is not None:
            with torch.device("meta"):
                add_adapter(copy, self.adapter, is_denoiser=True)
        copy.load_state_dict(state, strict=False, assign=True)
        missing = [name for name, param in copy.named_parameters() if param.is_meta and param.requires_grad]
        if missing:
            raise RuntimeError(f"The gathered state of {type(copy).__name__} lacks {missing[:3]}.")
        return copy.train(False)
