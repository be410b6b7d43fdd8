"""Fine-tune SDXL on captioned images: the full UNet, or LoRA adapters (optionally on both text encoders).

    accelerate launch train_text_to_image_sdxl.py \
      --pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0 \
      --pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix \
      --dataset_name=lambdalabs/naruto-blip-captions \
      --resolution=512 --center_crop --random_flip --proportion_empty_prompts=0.2 \
      --train_batch_size=1 --gradient_accumulation_steps=4 --gradient_checkpointing \
      --max_train_steps=10000 --use_8bit_adam --learning_rate=1e-06 --lr_scheduler="constant" \
      --lr_warmup_steps=0 --mixed_precision="fp16" --validation_prompt="a cute Sundar Pichai creature" \
      --validation_epochs 5 --checkpointing_steps=5000 --output_dir="sdxl-naruto-model"

Add `--use_lora --rank 8 [--train_text_encoder] [--output_kohya_format]` for LoRA. The flags of
diffusers' train_text_to_image_sdxl.py and train_text_to_image_lora_sdxl.py work unchanged.
Pivotal tuning on DreamBooth data: `--instance_data_dir=dog --instance_prompt="a photo of TOK dog"
--use_lora --train_text_encoder_ti` (README.md has the full example and how to load the result).
"""

from __future__ import annotations

import argparse
from functools import partial

from sdft import checks, cli, output, trainer
from sdft.builders import build, config_data, ddpm_objective, dreambooth_data, text_image_data
from sdft.families.sdxl import StableDiffusionXL
from sdft.training_run import Run

PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_model_args(parser)
    cli.add_vae_args(parser)
    cli.add_dataset_args(parser)
    cli.add_dreambooth_args(parser, hub_dataset=False, instance_prompt_required=False)
    cli.add_empty_prompt_args(parser)
    cli.add_image_args(parser)
    cli.add_kohya_data_args(parser)
    cli.add_latent_cache_args(parser)
    cli.add_training_args(parser)
    cli.add_optimizer_args(parser, choice=True)
    cli.add_memory_args(parser)
    cli.add_quantization_args(parser)
    cli.add_precision_args(parser, npu=True)
    cli.add_text_encoding_args(parser)
    cli.add_ddpm_objective_args(parser, prediction_types=PREDICTION_TYPES)
    cli.add_timestep_bias_args(parser)
    cli.add_loss_type_args(parser)
    cli.add_ddpm_recipe_args(parser)
    cli.add_ema_args(parser, offload=False)
    cli.add_lora_args(parser, text_encoder=True, kohya=True, debug_loss=True)
    cli.add_per_encoder_lr_args(parser)
    cli.add_textual_inversion_args(parser)
    cli.add_subject_args(parser)
    cli.add_single_file_args(parser)
    cli.add_bucket_args(parser)
    cli.add_validation_loss_args(parser)
    cli.add_checkpoint_args(parser)
    cli.add_divergence_args(parser)
    cli.add_validation_args(parser, prompt_list=False)
    cli.add_logging_args(parser, project_flag=False)
    cli.add_hub_args(parser)
    parser.set_defaults(output_dir="sdxl-model-finetuned", resolution=1024, train_batch_size=16, validation_epochs=1)
    return parser


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    own = [partial(checks.check_base_file, family="sdxl"),
           partial(checks.check_network_args, family="sdxl"), checks.check_t2i_or_dreambooth_data,
           partial(checks.check_prediction_type, allowed=PREDICTION_TYPES), checks.check_sdxl,
           checks.check_ddpm_recipes]
    return cli.parse(build_parser(), input_args, [*checks.COMMON, *own])


def main(args: argparse.Namespace) -> Run:
    family = StableDiffusionXL(vae_path=args.pretrained_vae_model_name_or_path, clip_skip=args.clip_skip,
                               max_token_length=args.max_token_length)
    data = config_data if args.dataset_config else dreambooth_data if args.instance_data_dir else text_image_data
    with build(args, family, make_objective=ddpm_objective, make_data=data,
               tracker_name="text2image-fine-tune-sdxl") as run:
        trainer.train(run)
        output.finish(run)
    return run  # finished; benchmarks/bench_train.py reads its timers (run.stats)


if __name__ == "__main__":
    cli.leave(cli.run(main, parse_args()))
