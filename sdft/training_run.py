"""What `sdft.builders.build` hands to the loop (`sdft.trainer.train`) and to the export
(`sdft.output.finish`): plain objects, decided before the first step, so nothing reads a flag later."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from sdft.adapters import LoraSpec
from sdft.checkpointing import Checkpointer, Position, TrainedWeights
from sdft.data.text_cache import TextCache
from sdft.families.protocol import Family
from sdft.families.source import ModelSource
from sdft.guards import NonFiniteGuard
from sdft.hub import CardInfo
from sdft.optim import EvalWeights
from sdft.plots import Pictures
from sdft.preemption import StopRequest
from sdft.quantization import BasePrecision
from sdft.run_stats import RunStats
from sdft.sharding import Sharding
from sdft.stepping import OptimizerStepper
from sdft.textual_inversion import TokenEmbeddings
from sdft.validation import SampleCadence, ValidationPlan
from sdft.validation_loss import ValidationLoss


@dataclass(frozen=True)
class ExportPlan:
    """What `output.finish` writes, decided from the flags when the run is built."""

    lora: bool                               # the LoRA file(s), else the diffusers folder
    kohya_lora: bool = False                 # --output_kohya_format: the kohya-layout LoRA file too
    diffusers_lora: bool = True              # the diffusers file (not for LoHa/LoKr, which diffusers cannot load)
    adapter: LoraSpec | None = None          # the adapter, to rebuild it on the saved pipeline for final images
    lora_dtype: torch.dtype | None = None    # None: the LoRA file in fp32
    # --prediction_type / --zero_terminal_snr, written into the exported scheduler (sdft.noise_schedule)
    scheduler_settings: dict = field(default_factory=dict)
    markers: tuple[str, ...] = ()            # v_pred / ztsnr marker keys of the single file
    single_file_dtype: torch.dtype | None = None   # --save_single_file in this precision; None: not written
    metadata: dict[str, str] = field(default_factory=dict)   # ss_*/modelspec.* header of single files
    card: CardInfo | None = None             # the model card, less what only the end of the run knows
    hub_repo: str | None = None              # --push_to_hub: the repository prepared at start-up
    # --base_precision/--text_encoder_precision: the final images' base is quantized as the run's was
    base_precision: BasePrecision = field(default_factory=BasePrecision)
    hub_token: str | None = None


@dataclass
class Run:
    """Everything the loop and the export need, built once by `builders.build`. Used as a context
    manager: SIGTERM/SIGINT are caught (checkpoint, then exit) from `with` to its end."""

    accelerator: Accelerator
    family: Family
    models: object                         # unwrapped, for validation and saving
    train_models: object                   # the same, with trained modules as prepared (DDP-wrapped)
    prepared: list                         # the prepared trained modules, for accumulate()
    denoiser: torch.nn.Module              # prepared denoiser
    objective: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: torch.utils.data.DataLoader
    dataset: torch.utils.data.Dataset
    sampler: object                        # EpochShuffleSampler, or a BucketBatchSampler (--enable_bucket)
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
    cadence: SampleCadence                 # when in-run sample sets are made
    output_dir: Path
    source: ModelSource
    export: ExportPlan | None = None       # set by build, read by output.finish
    position: Position = field(default_factory=Position)   # where the loop starts (a resumed checkpoint's)
    dream_detail_preservation: float | None = None
    params_to_clip: list = field(default_factory=list)
    train_text_encoders: bool = False
    text_encoder_stop_step: int | None = None   # --train_text_encoder_frac: optimizer steps [0, stop) train them
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
    stop: StopRequest = field(default_factory=StopRequest)  # SIGTERM/SIGINT: checkpoint, then exit
    val_loss: ValidationLoss | None = None                # held-out images (--validation_split/_data_dir)
    eval_weights: EvalWeights = field(default_factory=EvalWeights.none)   # schedule-free: x for eval and export
    scheduler_settings: dict = field(default_factory=dict)  # what validation samples with (sdft.noise_schedule)
    sampled_steps: set[int] = field(default_factory=set)   # steps with a sample set, so none is made twice
    sharding: Sharding | None = None                        # the engine (DDP, FSDP2, DeepSpeed) and its gathers

    def __enter__(self) -> "Run":
        self.stop.install()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.restore()
