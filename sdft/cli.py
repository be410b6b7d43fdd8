"""The command-line edge: the flags of the three training scripts, `parse`, and the process
wrapper `run`.

Each flag is declared once, in the argument-group function it belongs to. A script builds its
parser from the groups it needs and sets its own defaults visibly with `set_defaults`. Flag names,
types, defaults and choices follow the matching diffusers example scripts
(`tests/unit/test_cli_parity.py` holds the parsers to that contract). The parse-time checks are
in `sdft.checks`; `sdft.builders` turns the parsed flags into a run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import AbstractSet, Callable, Iterable, Sequence

from sdft import regional_compile
from sdft.errors import CliError, Finished, UserError
from sdft.objectives import FLOW_TIMESTEP_SAMPLING, HUBER_SCHEDULES, LOSS_TYPES
from sdft.optim import CURATED, LR_SCHEDULERS
from sdft.preemption import Interrupted

logger = logging.getLogger("sdft")

INTERPOLATION_MODES = ["bicubic", "bilinear", "box", "hamming", "lanczos", "nearest", "nearest_exact"]
TRACKERS = ["tensorboard", "wandb", "comet_ml", "all", "none"]

# What a flag means in a script that does not have it. `parse` sets these on the namespace, so the
# builders read every flag as `args.<name>` in every script.
WHEN_ABSENT = {
    "train_data_dir": None,
    "pretrained_vae_model_name_or_path": None, "train_text_encoder": False, "text_encoder_lr": None,
    "adam_weight_decay_text_encoder": None, "proportion_empty_prompts": 0.0, "prediction_type": None,
    "zero_terminal_snr": False, "clip_skip": None, "max_token_length": None,
    "learning_rate_te1": None, "learning_rate_te2": None, "train_text_encoder_frac": 1.0,
    "timestep_bias_strategy": "none", "dream_training": False,
    "input_perturbation": 0.0,
    "train_unet": True,
    "use_ema": False, "offload_ema": False, "foreach_ema": False, "non_ema_revision": None,
    "train_text_encoder_ti": False, "output_kohya_format": False, "debug_loss": False,
    # SD 1.x and SDXL have no flag: their LoRA files are written in fp32.
    "upcast_before_saving": True,
    # SD3 chooses its layers with --lora_layers/--lora_blocks.
    "lora_targets": "attn", "lora_target_regex": None,
    "enable_xformers_memory_efficient_attention": False, "enable_npu_flash_attention": False,
    "validation_prompts": None, "instance_data_dir": None, "with_prior_preservation": False, "sample_slg": None,
    # DDPM recipes (issue 21): not in the SD3 script.
    "debiased_estimation_loss": False, "min_timestep": None, "max_timestep": None,
    "multires_noise_iterations": None, "multires_noise_discount": 0.3, "ip_noise_gamma": None,
    "ip_noise_gamma_random_strength": False, "noise_offset_random_strength": False, "adaptive_noise_scale": None,
    # Flow-matching recipes (issue 21): SD3 only.
    "training_shift": None, "resolution_dependent_shift": False, "timestep_sampling": "table",
    "apply_t5_attn_mask": False, "pos_emb_random_crop_rate": 0.0,
    "max_train_samples": None,
}


# --------------------------------------------------------------------------- argument groups


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and output")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None, required=True,
                   help="Hub id or local folder of the base diffusers pipeline, or one .safetensors/.ckpt "
                        "checkpoint in the A1111/ComfyUI/Forge layout (converted once into a diffusers folder under "
                        "--cache_dir, else <output_dir>/.sdft-cache, and reused by later runs of the same file).")
    g.add_argument("--single_file_config", type=str, default=None,
                   help="For a single-file --pretrained_model_name_or_path: the diffusers folder or Hub id whose "
                        "component configs (and tokenizers, scheduler, and any component the file lacks, e.g. "
                        "SD3's T5) are used, e.g. stabilityai/stable-diffusion-xl-base-1.0. Default: the Hub "
                        "repository diffusers picks for the checkpoint's model type (needs the network).")
    g.add_argument("--revision", type=str, default=None, help="Hub revision of the base model.")
    g.add_argument("--variant", type=str, default=None,
                   help="Weight-file variant of the base model, e.g. 'fp16'.")
    g.add_argument("--cache_dir", type=str, default=None,
                   help="Where downloaded models and datasets are cached (default: the HF cache).")
    g.add_argument("--output_dir", type=str, default="sd-model-finetuned",
                   help="Where checkpoints, logs, validation images and the final model are written.")
    g.add_argument("--seed", type=int, default=None,
                   help="Seed for noise, shuffling and augmentation. Default: a random seed, "
                        "recorded in checkpoints so a resumed run continues the same stream.")


def add_vae_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                        help="Another VAE (a folder or Hub id without subfolder, or one .safetensors VAE file), "
                             "e.g. an fp16-safe SDXL VAE.")


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dataset")
    add_hub_dataset_args(g)
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="A local image folder or archive (.zip, .tar, .tar.gz, .tgz; any depth): with "
                        "metadata.jsonl/metadata.csv holding captions, a CSV whose name contains 'caption' "
                        "(columns image_file,caption), or images with same-name .txt caption files.")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="Keep only this many samples (shuffled with --seed first); for debugging.")


def add_kohya_data_args(parser: argparse.ArgumentParser) -> None:
    """kohya sd-scripts' dataset config and caption-augmentation flags, same names and meaning."""
    g = parser.add_argument_group("kohya dataset config and caption augmentation")
    g.add_argument("--dataset_config", type=str, default=None,
                   help="A kohya dataset config (.toml or .json: [general], [[datasets]], [[datasets.subsets]]) "
                        "instead of --train_data_dir/--dataset_name/--instance_data_dir; the flags below, "
                        "--resolution, --train_batch_size and the bucket flags are the defaults it overrides.")
    g.add_argument("--reg_data_dir", type=str, default=None,
                   help="With kohya N_name folders in --train_data_dir: a folder of N_name folders of regularisation "
                        "images, weighted by --prior_loss_weight and repeated to match the training items "
                        "(default: none).")
    g.add_argument("--dry_run", action="store_true",
                   help="Read the data and print what an epoch holds (items per subset, steps, buckets, example "
                        "captions, caption-cache size), then exit without loading a model.")
    g.add_argument("--caption_extension", type=str, default=None,
                   help="Caption files of kohya subsets and N_name folders: <image stem><extension>. Default: "
                        "'.caption' (kohya's), else '.txt' when an image has no .caption file.")
    g.add_argument("--shuffle_caption", action="store_true",
                   help="Shuffle the comma-separated tags of each caption, anew every epoch (default: off).")
    g.add_argument("--keep_tokens", type=int, default=0,
                   help="Keep this many leading tags in place when shuffling or dropping tags (default 0).")
    g.add_argument("--keep_tokens_separator", type=str, default="",
                   help="Tags before this string (and after a second one) stay in place, e.g. '|||' (default: none).")
    g.add_argument("--caption_separator", type=str, default=",", help="What separates tags (default ',').")
    g.add_argument("--secondary_separator", type=str, default="",
                   help="Tags joined by this string move and drop as one tag, e.g. ';;;' (default: none).")
    g.add_argument("--caption_dropout_rate", type=float, default=0.0,
                   help="Probability of training an item on the empty caption, drawn per item and epoch (default 0).")
    g.add_argument("--caption_dropout_every_n_epochs", type=int, default=0,
                   help="Train every N-th epoch (counting from 1) on empty captions only (default 0: never).")
    g.add_argument("--caption_tag_dropout_rate", type=float, default=0.0,
                   help="Probability of dropping each tag that is not kept, per item and epoch (default 0).")


def add_hub_dataset_args(g) -> None:
    g.add_argument("--dataset_name", type=str, default=None,
                   help="A Hub dataset id or a local dataset folder (loadable by datasets.load_dataset "
                        "or saved with save_to_disk).")
    g.add_argument("--dataset_config_name", type=str, default=None, help="Config name of --dataset_name.")
    g.add_argument("--image_column", type=str, default="image", help="Dataset column holding images.")
    g.add_argument("--caption_column", type=str, default="text",
                   help="Dataset column holding captions (a string, or a list: one is picked at random).")


def add_dreambooth_args(parser: argparse.ArgumentParser, *, hub_dataset: bool = True,
                        instance_prompt_required: bool = True) -> None:
    """`hub_dataset=False, instance_prompt_required=False`: the SD 1.x and SDXL scripts, where
    DreamBooth data (--instance_data_dir) is an alternative to --train_data_dir/--dataset_name."""
    g = parser.add_argument_group("DreamBooth data and prior preservation")
    if hub_dataset:
        add_hub_dataset_args(g)
    g.add_argument("--instance_data_dir", type=str, default=None,
                   help="Folder of instance images (the subject), or an archive of them (.zip, .tar, .tar.gz, "
                        ".tgz; any depth); other files are skipped. A caption.csv (image_file,caption) in it "
                        "captions its images instead of --instance_prompt."
                        + ("" if hub_dataset else
                           " Replaces --train_data_dir/--dataset_name; needs --instance_prompt."))
    g.add_argument("--instance_prompt", type=str, default=None, required=instance_prompt_required,
                   help="Prompt naming the subject, e.g. 'a photo of sks dog'; the caption of every instance "
                        "image without its own caption.")
    g.add_argument("--repeats", type=int, default=1, help="Repeat every instance image this many times per epoch.")
    g.add_argument("--with_prior_preservation", action="store_true",
                   help="Also train on class images with --class_prompt, to keep the model's idea of the class.")
    g.add_argument("--class_data_dir", type=str, default=None,
                   help="Folder (or archive) of class images; missing ones are generated with the base model.")
    g.add_argument("--class_prompt", type=str, default=None, help="Prompt of the class, e.g. 'a photo of dog'.")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the class-image loss.")
    g.add_argument("--num_class_images", type=int, default=100,
                   help="Class images to have in --class_data_dir; missing ones are generated.")
    g.add_argument("--sample_batch_size", type=int, default=4, help="Batch size when generating class images.")
    g.add_argument("--prior_generation_precision", type=str, default=None, choices=["no", "fp32", "fp16", "bf16"],
                   help="Precision of class-image generation (default: fp16 on a GPU, fp32 on the CPU).")


def add_image_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("image preprocessing")
    g.add_argument("--resolution", type=int, default=512,
                   help="Training resolution in pixels: the shorter side is resized to it, then a square is cropped "
                        "(with --enable_bucket: buckets of about this many pixels squared).")
    g.add_argument("--center_crop", action="store_true", help="Crop the centre (default: a random crop).")
    g.add_argument("--random_flip", action="store_true", help="Flip images horizontally with probability 0.5.")
    g.add_argument("--image_interpolation_mode", type=str, default="lanczos", choices=INTERPOLATION_MODES,
                   help="Resampling filter used when resizing.")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="Data-loading worker processes (0 loads in the main process).")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training loop")
    g.add_argument("--train_batch_size", type=int, default=16, help="Batch size per device.")
    g.add_argument("--num_train_epochs", type=int, default=100,
                   help="Epochs to train; ignored when --max_train_steps is given.")
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="Total optimizer steps; overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Micro-batches accumulated into one optimizer step.")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute activations in the backward pass to save memory.")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Clip the gradient norm to this value.")
    g.add_argument("--local_rank", type=int, default=-1,
                   help="Set by launchers; the LOCAL_RANK environment variable wins.")
    g.add_argument("--ddp_timeout", type=int, default=None,
                   help="Timeout of the multi-process group in minutes (kohya's name): how long a process waits "
                        "for the others at a collective before the run fails. Default: torch's (10 minutes for "
                        "NCCL, 30 for gloo).")


def add_optimizer_args(parser: argparse.ArgumentParser, *, choice: bool = False) -> None:
    g = parser.add_argument_group("optimizer and learning rate")
    if choice:
        g.add_argument("--optimizer", type=str, default="AdamW",
                       help="AdamW, Prodigy or Adafactor (case does not matter). Prodigy adapts the step size: "
                            "use --learning_rate=1.0. Adafactor (transformers', its own step size off) follows "
                            "--learning_rate and --lr_scheduler, takes --adam_weight_decay, and keeps a small "
                            "fraction of AdamW's optimizer state. --optimizer_type offers more and wins over it.")
    g.add_argument("--optimizer_type", type=str, default=None,
                   help=f"The optimizer, by name (case does not matter): {', '.join(e.name for e in CURATED.values())}; "
                        "or any importable optimizer class as module.Class (e.g. torch.optim.SGD). Wins over "
                        "--optimizer and --use_8bit_adam, which must then agree with it. Default: --optimizer. "
                        "See the README, Optimizers, for the package each one needs.")
    g.add_argument("--optimizer_args", type=str, default=None, nargs="*",
                   help="Arguments of the optimizer as key=value, e.g. weight_decay=0.1 betas=0.9,0.99 "
                        "decouple=True (numbers, True/False/None, comma-separated tuples, else strings); they "
                        "win over the --adam_* and --prodigy_* flags. Checked against the optimizer's signature. "
                        "Default: none.")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate (after warmup).")
    g.add_argument("--scale_lr", action="store_true",
                   help="Multiply the learning rate by accumulation steps x batch size x processes.")
    g.add_argument("--lr_scheduler", type=str, default="constant",
                   help=f"Learning-rate schedule, one of: {', '.join(LR_SCHEDULERS)}.")
    g.add_argument("--lr_warmup_steps", type=int, default=500,
                   help="Warmup in optimizer steps (the 'constant' schedule has none).")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Cycles of cosine_with_restarts.")
    g.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    g.add_argument("--use_8bit_adam", action="store_true",
                   help="Use bitsandbytes' 8-bit AdamW (the same as --optimizer_type AdamW8bit).")
    g.add_argument("--adam_beta1", type=float, default=0.9,
                   help="Adam beta1 (AdamW, AdamW8bit, PagedAdamW8bit, Prodigy; other optimizers take "
                        "--optimizer_args).")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="Adam beta2.")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="Decoupled weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-08, help="Adam epsilon.")
    if choice:
        g.add_argument("--prodigy_beta3", type=float, default=None,
                       help="Prodigy's beta3 for the step-size estimate (default: sqrt(beta2)).")
        g.add_argument("--prodigy_decouple", type=parse_bool, default=True, help="Prodigy: decoupled weight decay.")
        g.add_argument("--prodigy_use_bias_correction", type=parse_bool, default=True,
                       help="Prodigy: Adam's bias correction.")
        g.add_argument("--prodigy_safeguard_warmup", type=parse_bool, default=True,
                       help="Prodigy: do not let the step size grow during warmup.")


def add_memory_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("memory for full fine-tuning")
    g.add_argument("--fused_backward_pass", action="store_true",
                   help="Apply each parameter's optimizer update as soon as its gradient is complete, during the "
                        "backward pass, and free that gradient, so the gradients of the whole model are never "
                        "held at once. Any optimizer with a per-tensor step (AdamW, AdamW8bit, PagedAdamW8bit, "
                        "Lion, Lion8bit, Adafactor, CAME, AdEMAMix, SGDNesterov); on several processes each bucket "
                        "of gradients is averaged across them in the hooks before its step (no DDP); with gradient "
                        "accumulation the gradients add up as usual and the last micro-batch's backward pass "
                        "applies them (the saving is then at that pass only); gradient clipping is off with it. "
                        "Default: update after the backward pass.")
    g.add_argument("--full_bf16", action="store_true",
                   help="Keep the trained model's weights in bf16 (2 bytes per parameter instead of 4; needs "
                        "--mixed_precision bf16), with each update computed in fp32 and written back by "
                        "stochastic rounding so small updates are not lost. Default: fp32 weights.")
    g.add_argument("--blocks_to_swap", type=int, default=None,
                   help="Keep this many of the denoiser's blocks (SD3 transformer blocks; SD/SDXL down, mid and up "
                        "blocks, the last ones in running order) in host memory and copy each to the accelerator "
                        "just before it runs, the next one prefetched on a side stream (kohya's flag). Their "
                        "gradients and optimizer state stay in host memory and their optimizer step runs there. "
                        "Full fine-tunes and adapters, one process; not with --use_ema. No effect without an "
                        "accelerator. Default: every block on the accelerator.")
    g.add_argument("--torch_compile", action="store_true",
                   help="Compile each of the denoiser's blocks with torch.compile (inductor) when it first runs: "
                        "regional compilation, so the first step compiles one graph per kind of block. Bucket "
                        "shapes use torch's automatic dynamic shapes (one recompile at the second shape, none "
                        "after). The run summary reports the compile time apart. Default: eager.")
    g.add_argument("--compile_mode", type=str, default=None, choices=regional_compile.MODES,
                   help="torch.compile's mode with --torch_compile (reduce-overhead and max-autotune use CUDA "
                        "graphs). Default: default.")
    g.add_argument("--skip_memory_check", action="store_true",
                   help="Start even when the estimated memory of weights, gradients, optimizer state and EMA "
                        "exceeds the accelerator's memory (the machine's RAM on the CPU). Default: refuse.")


def add_quantization_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("quantized frozen base (LoRA)")
    g.add_argument("--base_precision", choices=["fp8", "int8", "nf4"], default=None,
                   help="Store the frozen denoiser's Linear weights in fp8, int8 (1 byte per weight) or nf4 "
                        "(about half a byte) while the adapters train in fp32 and every layer computes in the "
                        "training dtype; needs --use_lora and torchao (pip install -r "
                        "requirements-quantization.txt). The saved LoRA is for the full-precision base. "
                        "Default: the training dtype (--mixed_precision).")
    g.add_argument("--text_encoder_precision", choices=["fp8", "int8", "nf4"], default=None,
                   help="The same for the text encoders (frozen, or trained through LoRA). Default: the "
                        "training dtype.")
    g.add_argument("--fp8_base", action="store_true",
                   help="kohya's name for --base_precision fp8 --text_encoder_precision fp8.")
    g.add_argument("--fp8_base_unet", action="store_true",
                   help="kohya's name for --base_precision fp8 (the text encoders keep the training dtype).")


def add_text_encoder_frac_arg(g) -> None:
    g.add_argument("--train_text_encoder_frac", type=float, default=1.0,
                   help="With --train_text_encoder: train the text encoders for this fraction of the steps "
                        "(floor(frac x --max_train_steps), at least 1), then only the denoiser, as diffusers' "
                        "advanced scripts do. Default: 1.0, throughout.")


def add_text_encoder_optimizer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("text-encoder training")
    g.add_argument("--train_text_encoder", action="store_true",
                   help="Also train the CLIP text encoders (fully, or LoRA with --use_lora); T5 stays frozen.")
    add_text_encoder_frac_arg(g)
    g.add_argument("--text_encoder_lr", type=float, default=5e-6, help="Learning rate of the text encoders.")
    g.add_argument("--adam_weight_decay_text_encoder", type=float, default=1e-03,
                   help="Weight decay of the text encoders.")


def add_per_encoder_lr_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("text-encoder learning rates (SDXL)")
    for number, name in ((1, "CLIP ViT-L (text_encoder)"), (2, "OpenCLIP bigG (text_encoder_2)")):
        g.add_argument(f"--learning_rate_te{number}", type=float, default=None,
                       help=f"With --train_text_encoder: the learning rate of {name}; 0 keeps it frozen "
                            "(kohya's flag). Default: --learning_rate.")


def parse_bool(value: str) -> bool:
    """argparse's type=bool turns any non-empty string, "False" included, into True."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_precision_args(parser: argparse.ArgumentParser, *, npu: bool = False, xformers: bool = True) -> None:
    g = parser.add_argument_group("precision and speed")
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="Mixed precision; overrides the accelerate config. Frozen models are cast to it.")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    if xformers:
        g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="Use xformers attention (needs xformers and CUDA); PyTorch SDPA is used otherwise.")
    if npu:
        g.add_argument("--enable_npu_flash_attention", action="store_true",
                       help="Use flash attention on Ascend NPUs (needs torch_npu).")


def add_text_encoding_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("text encoding")
    g.add_argument("--clip_skip", type=int, default=None,
                   help="Condition on the CLIP layer this many from the end, as kohya and A1111 count: 2 = the "
                        "penultimate layer (what anime bases are trained with), through the final layer norm for "
                        "SD 1.x/2.x. diffusers' pipelines count one lower (clip_skip=1 there). Default: 1, the "
                        "model's usual layer (SDXL's is already the penultimate; 2 moves it one further back).")
    g.add_argument("--max_token_length", type=int, default=None, choices=[75, 150, 225],
                   help="Caption tokens read, in 75-token chunks encoded the way A1111/Forge/ComfyUI encode long "
                        "prompts (kohya's flag): 150 or 225 reads longer captions. Default: 75, one CLIP "
                        "sequence (77 with <BOS>/<EOS>); longer captions are cut.")


def add_ddpm_objective_args(parser: argparse.ArgumentParser, *, prediction_types: Sequence[str]) -> None:
    g = parser.add_argument_group("DDPM objective")
    g.add_argument("--prediction_type", type=str, default=None,
                   help=f"Override the scheduler's prediction type ({', '.join(prediction_types)}); "
                        "default: the model's own (for a single file, v_prediction when it carries a v_pred "
                        "marker key or modelspec.prediction_type 'v').")
    g.add_argument("--zero_terminal_snr", action="store_true",
                   help="Rescale the noise schedule's betas to zero terminal SNR (Lin et al. 2023; kohya's flag), "
                        "for v-prediction only; sampling then uses 'trailing' timesteps. Default: the base model's "
                        "schedule (rescaled when a single file carries a ztsnr marker key).")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="Min-SNR loss weighting with this gamma (5.0 is recommended); default: off.")
    g.add_argument("--noise_offset", type=float, default=0,
                   help="Scale of the per-channel noise offset; 0 disables it.")


def add_t2i_objective_extras(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("SD 1.x/2.x objective extras")
    g.add_argument("--input_perturbation", type=float, default=0,
                   help="Input perturbation of the noise (0.1 is recommended); 0 disables it.")
    g.add_argument("--dream_training", action="store_true",
                   help="DREAM training (arXiv 2312.00210); epsilon prediction only.")
    g.add_argument("--dream_detail_preservation", type=float, default=1.0,
                   help="DREAM detail-preservation exponent p.")


def add_flow_objective_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("flow-matching objective")
    g.add_argument("--weighting_scheme", type=str, default="logit_normal",
                   choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
                   help="How timesteps are sampled and the loss weighted (SD3 paper, section 3.1); "
                        "'none' samples uniformly with weight 1.")
    g.add_argument("--logit_mean", type=float, default=0.0,
                   help="Mean of the logit-normal density. Note: positive values favour LOW noise here "
                        "(the scheduler's table runs from high to low noise), the opposite of the paper.")
    g.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the logit-normal density.")
    g.add_argument("--mode_scale", type=float, default=1.29, help="Scale s of the 'mode' density.")
    g.add_argument("--precondition_outputs", type=int, default=1,
                   help="1: compare the x0 estimate (pred * -sigma + x_t) with x0; 0: compare pred with the "
                        "velocity (noise - x0).")
    g.add_argument("--max_sequence_length", type=int, default=77, help="T5 tokens per prompt (at most 512).")


def add_loss_type_args(parser: argparse.ArgumentParser) -> None:
    """kohya sd-scripts' loss-type flags (names, choices and defaults), in all three scripts."""
    g = parser.add_argument_group("loss type (kohya sd-scripts' flags)")
    g.add_argument("--loss_type", type=str, default="l2", choices=list(LOSS_TYPES),
                   help="Elementwise loss between prediction and target: l2 (squared error, the default), l1, "
                        "huber (pseudo-Huber, 2c(sqrt(r^2 + c^2) - c): L2-like below c, L1-like above) or "
                        "smooth_l1 (the same divided by c). Combines with --snr_gamma / --weighting_scheme, "
                        "masks and prior preservation.")
    g.add_argument("--huber_schedule", type=str, default="snr", choices=list(HUBER_SCHEDULES),
                   help="How the Huber threshold c varies with the timestep (huber and smooth_l1 only): constant "
                        "(c = huber_c * huber_scale), exponential (c = huber_scale * huber_c^(t/T)) or snr "
                        "(default: c from huber_c at pure noise to 1 on clean inputs; ignores --huber_scale, "
                        "as kohya does).")
    g.add_argument("--huber_c", type=float, default=0.1,
                   help="Huber threshold c at the noisiest timestep (> 0; default 0.1).")
    g.add_argument("--huber_scale", type=float, default=1.0,
                   help="Multiplier of the constant and exponential Huber thresholds (> 0; default 1.0).")


def add_ddpm_recipe_args(parser: argparse.ArgumentParser) -> None:
    """kohya sd-scripts' noise, timestep and weighting knobs for the DDPM scripts (SD 1.x/2.x, SDXL)."""
    g = parser.add_argument_group("DDPM noise and timestep recipes (kohya sd-scripts' flags)")
    g.add_argument("--debiased_estimation_loss", action="store_true",
                   help="Weight the loss by 1/sqrt(SNR) (epsilon) or 1/(SNR+1) (v-prediction), arXiv 2310.08442; "
                        "multiplies --snr_gamma's weight when both are on. Default: off.")
    g.add_argument("--min_timestep", type=int, default=None,
                   help="Train only on timesteps >= this (default: 0).")
    g.add_argument("--max_timestep", type=int, default=None,
                   help="Train only on timesteps < this, exclusive (default: the scheduler's 1000).")
    g.add_argument("--multires_noise_iterations", type=int, default=None,
                   help="Multi-resolution (pyramid) noise with this many levels, 6-10 is typical "
                        "(default: off).")
    g.add_argument("--multires_noise_discount", type=float, default=0.3,
                   help="Weight of each coarser pyramid level relative to the previous one (default 0.3).")
    g.add_argument("--ip_noise_gamma", type=float, default=None,
                   help="Input-perturbation noise gamma (0.1 is typical; arXiv 2301.11706); the same knob as "
                        "--input_perturbation of the SD 1.x script. Default: off.")
    g.add_argument("--ip_noise_gamma_random_strength", action="store_true",
                   help="Draw the input-perturbation gamma uniformly from [0, --ip_noise_gamma) for every batch.")
    g.add_argument("--noise_offset_random_strength", action="store_true",
                   help="Draw the noise-offset strength uniformly from [0, --noise_offset) for every batch "
                        "(needs --noise_offset).")
    g.add_argument("--adaptive_noise_scale", type=float, default=None,
                   help="Add this times |mean of each latent channel| to --noise_offset, per sample and channel "
                        "(needs --noise_offset; about a tenth of it is typical; may be negative; default: off).")


def add_flow_recipe_args(parser: argparse.ArgumentParser) -> None:
    """SD3's timestep shift and sampling (issue 21)."""
    g = parser.add_argument_group("SD3 timestep shift and sampling")
    g.add_argument("--training_shift", "--flow_shift", type=float, default=None, dest="training_shift",
                   help="Timestep shift s: sigma -> s*sigma / (1 + (s-1)*sigma); s > 1 trains more on noisy "
                        "timesteps (composition), s < 1 on detail. Replaces the scheduler's own shift (3.0 for "
                        "SD3 models), as kohya's --training_shift does; 1 is no shift. Default: the scheduler's "
                        "shift.")
    g.add_argument("--resolution_dependent_shift", action="store_true",
                   help="Shift each batch by the amount its resolution implies, as SD3's scheduler computes for "
                        "dynamic shifting: exp(mu), mu linear in the number of latent patches (0.5 at 256, 1.15 at "
                        "4096 patches, i.e. 1024px); replaces the scheduler's shift (SimpleTuner's "
                        "--flow_schedule_auto_shift). Default: off.")
    g.add_argument("--timestep_sampling", type=str, default="table", choices=list(FLOW_TIMESTEP_SAMPLING),
                   help="table (default): pick sigma from the scheduler's 1000-entry table with the "
                        "--weighting_scheme density; uniform: sigma ~ U(0, 1], ignoring the density (its loss "
                        "weighting still applies), like kohya's --weighting_scheme uniform and FLUX "
                        "--timestep_sampling uniform. Stability suggested --training_shift 1 with uniform.")


def add_sd3_text_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("SD3 text conditioning")
    g.add_argument("--apply_t5_attn_mask", action="store_true",
                   help="Mask T5's padding tokens: T5 attends only to the prompt's tokens and the padding "
                        "positions are zeroed, in training, the text cache and validation (kohya's flag). "
                        "Default: off, as the SD3 pipeline.")
    g.add_argument("--max_token_length", type=int, default=None,
                   help="Not for SD3 (refused, with the reason): long captions reach SD3 through T5, so raise "
                        "--max_sequence_length instead; CLIP-L/G stay one 77-token sequence.")


def add_pos_embed_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pos_emb_random_crop_rate", type=float, default=0.0,
                        help="Probability per step of cutting a random window of the transformer's positional-"
                             "embedding grid instead of the centre one (kohya's flag; SD3.5 Medium was trained "
                             "this way, so buckets of several sizes train the same positions; 0.2 is typical). "
                             "Default 0: always the centre, as the pipeline.")


def add_timestep_bias_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("timestep bias")
    g.add_argument("--timestep_bias_strategy", type=str, default="none", choices=["earlier", "later", "range", "none"],
                   help="Sample some timesteps more often: 'later' (noisier, composition), 'earlier' (less "
                        "noise, detail), 'range' (begin..end); 'none' samples uniformly.")
    g.add_argument("--timestep_bias_multiplier", type=float, default=1.0,
                   help="Sampling weight of the biased timesteps relative to the others (> 0; < 1 de-emphasises).")
    g.add_argument("--timestep_bias_begin", type=int, default=0, help="First timestep of the 'range' strategy.")
    g.add_argument("--timestep_bias_end", type=int, default=1000,
                   help="End of the 'range' strategy, exclusive (timesteps begin..end-1).")
    g.add_argument("--timestep_bias_portion", type=float, default=0.25,
                   help="Fraction of the timesteps biased by 'earlier'/'later'.")


def add_empty_prompt_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--proportion_empty_prompts", type=float, default=0,
                        help="Fraction of captions replaced by the empty prompt, drawn anew every epoch "
                             "(trains unconditional generation for classifier-free guidance).")


def add_textual_inversion_args(parser: argparse.ArgumentParser) -> None:
    """The pivotal-tuning flags of diffusers' train_dreambooth_lora_sdxl_advanced.py, plus
    --initializer_concept (from its Flux sibling) and --train_unet (ours)."""
    g = parser.add_argument_group("pivotal tuning and textual inversion")
    g.add_argument("--train_text_encoder_ti", action="store_true",
                   help="Learn new tokens (textual inversion) in every CLIP text encoder: each --token_abstraction "
                        "in captions and prompts becomes new tokens <s0><s1>...; only their embedding rows train. "
                        "Writes <output_dir>/<name>_emb.safetensors.")
    g.add_argument("--token_abstraction", type=str, default="TOK",
                   help="Comma-separated identifiers, each replaced by its new tokens in every caption and prompt "
                        "(instance, class, validation).")
    g.add_argument("--num_new_tokens_per_abstraction", type=int, default=2,
                   help="New tokens (embedding rows) per --token_abstraction.")
    g.add_argument("--train_text_encoder_ti_frac", type=float, default=0.5,
                   help="Share of the optimizer steps during which the new embeddings train (the first ones); "
                        "the UNet goes on training after that.")
    g.add_argument("--initializer_concept", type=str, default=None,
                   help="Start the new embeddings from this text's token embeddings (new token i takes token "
                        "i mod n); default: random, scaled to the spread of the existing embeddings.")
    g.add_argument("--train_unet", type=parse_bool, default=True,
                   help="false: freeze the UNet and learn only the new tokens (textual inversion; the embeddings "
                        "then train for every step).")


def add_ema_args(parser: argparse.ArgumentParser, *, offload: bool, non_ema_revision: bool = True) -> None:
    """`non_ema_revision=False`: a family whose loader takes no separate revision for the trained copy (SD3)."""
    g = parser.add_argument_group("EMA")
    g.add_argument("--use_ema", action="store_true",
                   help="Keep an exponential moving average of the weights; the saved model is the EMA.")
    g.add_argument("--ema_decay", type=float, default=0.9999,
                   help="Decay of the EMA per optimizer step (diffusers' EMAModel warms it up from 0 over "
                        "the first steps); default 0.9999.")
    if offload:
        g.add_argument("--offload_ema", action="store_true",
                       help="Keep the EMA weights in pinned CPU memory between updates.")
        g.add_argument("--foreach_ema", action="store_true", help="Update the EMA with torch._foreach ops.")
    if offload and non_ema_revision:
        g.add_argument("--non_ema_revision", type=str, default=None,
                       help="Hub revision to load the trained (non-EMA) denoiser from; default: --revision.")


def add_lora_args(parser: argparse.ArgumentParser, *, text_encoder: bool = False, kohya: bool = False,
                  debug_loss: bool = False, targets: bool = True) -> None:
    g = parser.add_argument_group("LoRA")
    g.add_argument("--use_lora", action="store_true",
                   help="Train LoRA adapters instead of the full model; writes pytorch_lora_weights.safetensors.")
    g.add_argument("--rank", type=int, default=4, help="Adapter rank (kohya's network_dim).")
    if text_encoder:
        g.add_argument("--train_text_encoder", action="store_true",
                       help="Also train the CLIP text encoder(s): fully, or adapters with --use_lora (q/k/v/out "
                            "projections; with --lora_targets attn-mlp or full also the MLPs). Trained encoders "
                            "are saved in every output; the text-encoder cache cannot be used with them.")
        add_text_encoder_frac_arg(g)
    if kohya:
        g.add_argument("--output_kohya_format", action="store_true",
                       help="Also write pytorch_lora_weights_kohya.safetensors: the adapter in the kohya/LyCORIS "
                            "layout (lora_unet_* or SD3's lora_transformer_*, lora_te_* or lora_te1_*/lora_te2_*), the "
                            "file ComfyUI, A1111 and Forge load from models/loras. Always written for --lora_type "
                            "loha/lokr.")
    if debug_loss:
        g.add_argument("--debug_loss", action="store_true",
                       help="Also log each image's own loss, keyed by its file name.")
    add_adapter_args(g, targets=targets)


def add_adapter_args(g, *, targets: bool) -> None:
    """Adapter type, scale, targets and regularisers (sdft.adapters), in every script."""
    g.add_argument("--lora_alpha", type=float, default=None,
                   help="Adapter alpha: updates are scaled by alpha/rank (default: the rank, scale 1; "
                        "kohya recipes often use 1 or rank/2).")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA path (default 0).")
    g.add_argument("--lora_type", type=str, default="lora", choices=["lora", "locon", "loha", "lokr"],
                   help="Adapter type: lora; locon (LoRA on the convolutions too: implies --lora_targets full; SD3: "
                        "adds its one convolution, the patch embedding pos_embed.proj); loha (LoHa, Hadamard "
                        "product); lokr (LoKr, Kronecker product). Default: lora.")
    g.add_argument("--use_dora", action="store_true",
                   help="DoRA: learn a magnitude per output row beside the LoRA direction (--lora_type lora/locon).")
    g.add_argument("--conv_rank", type=int, default=None,
                   help="Rank of the 3x3 convolution adapters (kohya's conv_dim; default: --rank).")
    g.add_argument("--conv_alpha", type=float, default=None,
                   help="Alpha of the 3x3 convolution adapters (default: --lora_alpha, or --conv_rank when given).")
    g.add_argument("--lokr_factor", type=int, default=-1,
                   help="LoKr: the factor splitting each dimension into the two Kronecker factors "
                        "(default -1: the most square split).")
    g.add_argument("--rank_dropout", type=float, default=0.0,
                   help="LoHa/LoKr: probability of dropping each rank channel during training (default 0).")
    g.add_argument("--module_dropout", type=float, default=0.0,
                   help="LoHa/LoKr: probability of skipping a whole adapter during a step (default 0).")
    g.add_argument("--loraplus_lr_ratio", type=float, default=None,
                   help="LoRA+: train the up (B) matrices at this multiple of their group's learning rate, text "
                        "encoders included (the LoRA+ paper suggests 16; kohya's loraplus_lr_ratio). Default: off.")
    g.add_argument("--init_lora", type=str, default=None,
                   help="Start the adapters from this file instead of fresh: a kohya/LyCORIS file or a diffusers/PEFT "
                        "pytorch_lora_weights.safetensors (or its folder). Its type, layers, rank and alpha must match "
                        "this run's adapter flags. The optimizer starts fresh (--resume_from_checkpoint restores it "
                        "too). Default: none.")
    g.add_argument("--network_args", type=str, nargs="*", default=None,
                   help="kohya's per-block and per-regex adapter settings, key=value each: block_dims, block_alphas, "
                        "conv_block_dims, conv_block_alphas, down_lr_weight, mid_lr_weight, up_lr_weight, "
                        "block_lr_zero_threshold (SD 1.x/2.x: 25 blocks, SDXL: 23), network_reg_dims, network_reg_lrs "
                        "('regex=value,...', every script), block_preset (in, mid, out; SDXL also blora, "
                        "blora_content, blora_style). README.md has examples. Default: none.")
    if targets:
        g.add_argument("--lora_targets", type=str, default="attn", choices=["attn", "attn-mlp", "full"],
                       help="Layers adapted: attn (attention q/k/v/out, the default), attn-mlp (kohya's LoRA: every "
                            "linear and 1x1 layer of the transformer blocks, and the text encoders' MLPs), full "
                            "(attn-mlp plus the ResNet blocks and up/downsamplers, 3x3 convolutions included).")
        g.add_argument("--lora_target_regex", type=str, default=None,
                       help="Adapt exactly the Linear/Conv2d layers whose module name matches this Python regex "
                            "(re.search, e.g. 'attn2|ff'); replaces --lora_targets. Default: none.")


def add_sd3_lora_args(parser: argparse.ArgumentParser) -> None:
    add_lora_args(parser, kohya=True, targets=False)
    g = parser.add_argument_group("SD3 LoRA")
    g.add_argument("--lora_layers", type=str, default=None,
                   help="Comma-separated module names to adapt, e.g. 'attn.to_k,attn.to_q,attn.to_v,attn.to_out.0' "
                        "(default: all attention projections, context ones included).")
    g.add_argument("--lora_blocks", type=str, default=None,
                   help="Comma-separated transformer block indices to adapt, e.g. '12,13,14' (default: all).")
    g.add_argument("--upcast_before_saving", action="store_true",
                   help="Save the LoRA in fp32 (default: in the training precision, as upstream).")


def add_single_file_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("single-file checkpoint")
    g.add_argument("--save_single_file", action="store_true",
                   help="Full fine-tuning: also write <output_dir>/<name of output_dir>.safetensors, one checkpoint "
                        "in the original Stability layout (denoiser, VAE, text encoders) for ComfyUI, A1111 and "
                        "Forge. Default: only the diffusers folder.")
    g.add_argument("--save_precision", type=str, default=None, choices=["fp16", "bf16", "fp32"],
                   help="Precision of the --save_single_file checkpoint (default: the training precision, "
                        "i.e. that of --mixed_precision, fp32 without it).")


def add_latent_cache_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("caches (see README, Large datasets)")
    g.add_argument("--cache_latents", action="store_true",
                   help="Encode every image once before training, keep the VAE posteriors in RAM and free the "
                        "VAE from the GPU; the crop is then fixed per image (with --random_flip the mirror image "
                        "is cached too and the flip still varies per epoch).")
    g.add_argument("--cache_latents_to_disk", action="store_true",
                   help="Like --cache_latents, but one file per image in --latents_cache_dir, read lazily during "
                        "training and reused by later runs while the image, VAE and transform match.")
    g.add_argument("--latents_cache_dir", type=str, default=None,
                   help="Folder of the disk caches (default: <output_dir>/cache).")
    g.add_argument("--cache_text_encoder_outputs", action="store_true",
                   help="With frozen text encoders: encode every distinct caption once, keep the outputs in RAM "
                        "and free the text encoders from the GPU (default: only when there are at most 64).")
    g.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true",
                   help="Like --cache_text_encoder_outputs, but one file per caption in --latents_cache_dir, "
                        "reused by later runs with the same encoders.")


def add_subject_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("subject preprocessing and masked loss (run once, before training)")
    g.add_argument("--caption_model", type=str, default=None,
                   help="A BLIP captioning model (Hub id or folder, e.g. Salesforce/blip-image-captioning-large) "
                        "that captions every image without a caption; all captions are written to "
                        "<output_dir>/captions.csv. Default: no auto-captions.")
    g.add_argument("--caption_prefix", type=str, default=None,
                   help="Text put in front of every generated caption, e.g. 'a photo of TOK, '.")
    g.add_argument("--upscale_model", type=str, default=None,
                   help="A Swin2SR super-resolution model (e.g. caidas/swin2SR-classical-sr-x2-64) that upscales "
                        "every image whose shorter side is below --resolution, cached in <output_dir>/.sdft-cache. "
                        "Default: small images are resized up.")
    g.add_argument("--masked_loss", action="store_true",
                   help="Weight the loss per latent pixel by the subject mask (normalised by the mask's area); "
                        "needs --mask_data_dir, --alpha_mask or --mask_model. Class images stay unmasked.")
    g.add_argument("--mask_data_dir", type=str, default=None,
                   help="Folder of masks (white = subject), one per image with the image's file stem; "
                        "preferred over the other mask sources.")
    g.add_argument("--alpha_mask", action="store_true",
                   help="Use an image's alpha channel as its mask (images without alpha count in full).")
    g.add_argument("--mask_model", type=str, default=None,
                   help="A CLIPSeg model (e.g. CIDAS/clipseg-rd64-refined) that makes the masks of images that "
                        "have none, from --mask_target_prompts; saved in <output_dir>/masks.")
    g.add_argument("--mask_target_prompts", type=str, default=None, nargs="+",
                   help="What --mask_model looks for, e.g. 'a face' (several: the union).")
    g.add_argument("--crop_to_mask", action="store_true",
                   help="Centre the square crop on the mask (instead of a random or centre crop).")


def add_divergence_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip_nan_steps", type=int, default=0,
                        help="Skip up to this many optimizer steps whose loss (or gradient norm) is NaN or "
                             "infinite, logging each; the step still counts and the LR schedule advances. "
                             "Default 0: the first such step stops the run before it is applied.")


def add_bucket_args(parser: argparse.ArgumentParser, *, multiple: int = 8) -> None:
    """kohya sd-scripts' bucket flags. `multiple`: what --bucket_reso_steps must divide into for
    this family (8 = the VAE's downsampling; SD3 needs 16: VAE 8 x transformer patch 2)."""
    g = parser.add_argument_group("aspect-ratio buckets")
    g.add_argument("--enable_bucket", action="store_true",
                   help="Train each image near its own aspect ratio: images are grouped into buckets of about "
                        "--resolution² pixels and every batch holds one bucket's images (default: every image is "
                        "cropped to a --resolution square).")
    g.add_argument("--min_bucket_reso", type=int, default=256, help="Smallest bucket side in pixels.")
    g.add_argument("--max_bucket_reso", type=int, default=1024, help="Largest bucket side in pixels.")
    g.add_argument("--bucket_reso_steps", type=int, default=64,
                   help=f"Bucket sides are multiples of this many pixels (a multiple of {multiple}).")
    g.add_argument("--bucket_no_upscale", action="store_true",
                   help="Never enlarge an image: one its bucket would enlarge gets a smaller bucket of its own.")


def add_validation_loss_args(parser: argparse.ArgumentParser, *, dreambooth: bool = False) -> None:
    """kohya sd-scripts' held-out validation-loss flags (image validation is add_validation_args)."""
    g = parser.add_argument_group("validation loss on held-out images")
    g.add_argument("--validation_split", type=float, default=0.0,
                   help="Fraction of the training images held out (never trained on) to compute val_loss on; "
                        "0 (default) holds none out.")
    g.add_argument("--validation_data_dir", type=str, default=None,
                   help="A folder of held-out images to compute val_loss on, "
                        + ("captioned with --instance_prompt." if dreambooth else
                           "laid out like --train_data_dir (with --instance_data_dir: images captioned with "
                           "--instance_prompt)."))
    g.add_argument("--validation_seed", type=int, default=None,
                   help="Seed choosing the held-out images and the fixed noise and timesteps of val_loss "
                        "(default: --seed).")
    g.add_argument("--validate_every_n_steps", type=int, default=None,
                   help="Compute val_loss every N optimizer steps (default: at the end of every epoch).")


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="Save a resumable checkpoint-N folder every N optimizer steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None,
                   help="Keep at most this many checkpoint folders (oldest removed); default: all.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="A checkpoint folder (a path, or a name inside --output_dir) or 'latest'.")


def add_validation_args(parser: argparse.ArgumentParser, *, prompt_list: bool) -> None:
    g = parser.add_argument_group("validation")
    if prompt_list:
        g.add_argument("--validation_prompts", type=str, default=None, nargs="+",
                       help="Prompts rendered once each at every validation.")
    g.add_argument("--validation_prompt", type=str, default=None,
                   help="A prompt rendered --num_validation_images times at every validation.")
    g.add_argument("--num_validation_images", type=int, default=4,
                   help="Images generated for --validation_prompt.")
    g.add_argument("--validation_epochs", type=int, default=5,
                   help="Make a sample set every N epochs (the first epoch included). Ignored with a step cadence "
                        "(--sample_every_n_steps/--validation_steps) unless --sample_every_n_epochs is given.")
    g.add_argument("--validation_steps", type=int, default=None,
                   help="Make a sample set every N optimizer steps; the same as --sample_every_n_steps.")
    g.add_argument("--sample_every_n_steps", type=int, default=None,
                   help="Make a sample set every N optimizer steps (kohya's name). Default: by epochs only.")
    g.add_argument("--sample_every_n_epochs", type=int, default=None,
                   help="Make a sample set every N epochs (kohya's name); overrides --validation_epochs and "
                        "combines with a step cadence. Default: --validation_epochs.")
    g.add_argument("--sample_at_first", action="store_true",
                   help="Also make a sample set before the first step (step 0, the base weights). Default: off.")
    g.add_argument("--sample_prompts", type=str, default=None,
                   help="A prompt file for the sample sets (README, Samples): .txt, one prompt a line with kohya's "
                        "options --n negative, --w/--h size, --d seed, --l guidance scale, --s steps, --ss sampler; "
                        "or .toml/.json with the same fields. Added to --validation_prompt(s).")
    g.add_argument("--sample_sampler", type=str, default=None,
                   help="Sampler of the sample sets unless a prompt says --ss: ddim, euler, euler_a, heun, lms, "
                        "dpm2, dpm2_a, 'dpm++ 2m' (dpmsolver++), 'dpm++ 2m sde', 'dpm++ sde', unipc, deis, most "
                        "with a ' karras' variant; SD3: euler or heun (flow matching). Default: the model's own "
                        "scheduler.")


def add_sd3_sample_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample_slg", type=str, default=None,
                        help="Skip-layer guidance in the sample sets: comma-separated transformer block indices, "
                             "e.g. '7,8,9' for SD3.5 Medium (the pipeline's scale 2.8, from 1%% to 20%% of the "
                             "steps). Default: off.")


def add_logging_args(parser: argparse.ArgumentParser, *, project_flag: bool) -> None:
    g = parser.add_argument_group("logging")
    g.add_argument("--report_to", type=str, default="tensorboard",
                   help=f"Tracker: {', '.join(TRACKERS)}.")
    g.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    if project_flag:
        g.add_argument("--tracker_project_name", type=str, default="text2image-fine-tune",
                       help="Project name given to the tracker.")


def add_hub_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Hugging Face Hub")
    g.add_argument("--push_to_hub", action="store_true",
                   help="Upload the output folder (without checkpoint folders) to the Hub at the end.")
    g.add_argument("--hub_token", type=str, default=None, help="Hub token; default: the cached login.")
    g.add_argument("--hub_model_id", type=str, default=None,
                   help="Hub repository id; default: the name of --output_dir.")


# --------------------------------------------------------------------------- parsing


Check = Callable[[argparse.Namespace, AbstractSet[str]], None]


def parse(parser: argparse.ArgumentParser, input_args: Sequence[str] | None,
          checks: Iterable[Check]) -> argparse.Namespace:
    """Parse, apply LOCAL_RANK, fill in the flags the script lacks (WHEN_ABSENT), then run the
    script's checks with the flags the user typed; a CliError becomes parser.error."""
    argv = list(sys.argv[1:] if input_args is None else input_args)
    args = parser.parse_args(argv)
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_rank != -1:
        args.local_rank = env_rank
    for name, value in WHEN_ABSENT.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    given = frozenset(given_flags(parser, argv))
    try:
        for check in checks:
            check(args, given)
    except CliError as err:
        parser.error(str(err))
    return args


_UNSET = object()


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests the user typed on the command line (as opposed to defaults)."""
    probe = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": _UNSET}
            if action.nargs == 0:
                kwargs["action"] = "store_const"
                kwargs["const"] = True
            else:
                kwargs["nargs"] = action.nargs
            probe.add_argument(*action.option_strings, **kwargs)
    known, _ = probe.parse_known_args(argv)
    return {k for k, v in vars(known).items() if v is not _UNSET}




# --------------------------------------------------------------------------- the process wrapper


# A finished run of a launched worker, kept alive until `leave` (see there).
_FINISHED: list[object] = []


def launched_worker() -> bool:
    """One of several processes started by `accelerate launch` / torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run(main: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> int:
    """Entry-point wrapper: a bad input ends the run with its message instead of a traceback."""
    try:
        finished = main(args)
        if launched_worker():
            _FINISHED.append(finished)
    except Finished:
        return 0
    except Interrupted as err:
        logger.warning("%s", err)
        print(f"interrupted: {err}", file=sys.stderr)
        return err.exit_code
    except UserError as err:
        logger.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def leave(code: int) -> None:
    """Ends a script's process with `code`. A launched worker leaves without Python's teardown once its
    run has returned (all processes passed the final barrier; every file is written and closed):
    freeing DDP's reducer after accelerate destroyed the process group runs gloo's destructor with the
    GIL held, and it joins a gloo thread that is waiting for the GIL to free a finished collective's
    tensors. That deadlock hung a 2-process run at exit on a loaded machine (2026-12-08)."""
    if launched_worker():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
