"""Fine-tune Stable Diffusion 1.x / 2.x on captioned images: the full UNet, or LoRA adapters.

    accelerate launch --mixed_precision="fp16" train_text_to_image.py \
      --pretrained_model_name_or_path=CompVis/stable-diffusion-v1-4 \
      --dataset_name=lambdalabs/naruto-blip-captions \
      --use_ema --resolution=512 --center_crop --random_flip \
      --train_batch_size=1 --gradient_accumulation_steps=4 --gradient_checkpointing \
      --max_train_steps=15000 --learning_rate=1e-05 --max_grad_norm=1 \
      --lr_scheduler="constant" --lr_warmup_steps=0 --output_dir="sd-naruto-model"

Add `--use_lora --rank 4` (and usually `--learning_rate=1e-04`) to train LoRA adapters instead.
The flags of diffusers' train_text_to_image.py work unchanged; `--help` lists them all.
DreamBooth data: `--instance_data_dir=dog --instance_prompt="a photo of TOK dog"` (prior preservation
as in the SD3 script); new tokens: `--train_text_encoder_ti` (with `--train_unet=false`: textual inversion).
"""

from __future__ import annotations

import argparse
from functools import partial

from sdft import checks, cli, output, trainer
from sdft.builders import build, config_data, ddpm_objective, dreambooth_data, text_image_data
from sdft.families.sd import StableDiffusion
from sdft.training_run import Run

PREDICTION_TYPES = ["epsilon", "v_prediction"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_model_args(parser)
    cli.add_dataset_args(parser)
    cli.add_dreambooth_args(parser, hub_dataset=False, instance_prompt_required=False)
    cli.add_image_args(parser)
    cli.add_kohya_data_args(parser)
    cli.add_latent_cache_args(parser)
    cli.add_training_args(parser)
    cli.add_optimizer_args(parser, choice=True)
    cli.add_memory_args(parser)
    cli.add_quantization_args(parser)
    cli.add_precision_args(parser)
    cli.add_text_encoding_args(parser)
    cli.add_ddpm_objective_args(parser, prediction_types=PREDICTION_TYPES)
    cli.add_t2i_objective_extras(parser)
    cli.add_loss_type_args(parser)
    cli.add_ddpm_recipe_args(parser)
    cli.add_ema_args(parser, offload=True)
    cli.add_lora_args(parser, text_encoder=True, kohya=True)
    cli.add_textual_inversion_args(parser)
    cli.add_subject_args(parser)
    cli.add_single_file_args(parser)
    cli.add_bucket_args(parser)
    cli.add_validation_loss_args(parser)
    cli.add_checkpoint_args(parser)
    cli.add_divergence_args(parser)
    cli.add_validation_args(parser, prompt_list=True)
    cli.add_logging_args(parser, project_flag=True)
    cli.add_hub_args(parser)
    parser.set_defaults(output_dir="sd-model-finetuned", resolution=512, train_batch_size=16, validation_epochs=5)
    return parser


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    own = [partial(checks.check_base_file, family="sd"),
           partial(checks.check_network_args, family="sd"), checks.check_t2i_or_dreambooth_data,
           partial(checks.check_prediction_type, allowed=PREDICTION_TYPES), checks.check_ddpm_recipes]
    return cli.parse(build_parser(), input_args, [*checks.COMMON, *own])


def main(args: argparse.Namespace) -> Run:
    family = StableDiffusion(denoiser_revision=args.non_ema_revision, clip_skip=args.clip_skip,
                             max_token_length=args.max_token_length)
    data = config_data if args.dataset_config else dreambooth_data if args.instance_data_dir else text_image_data
    with build(args, family, make_objective=ddpm_objective, make_data=data,
               tracker_name=args.tracker_project_name) as run:
        trainer.train(run)
        output.finish(run)
    return run  # finished; benchmarks/bench_train.py reads its timers (run.stats)


if __name__ == "__main__":
    cli.leave(cli.run(main, parse_args()))
