"""DreamBooth for Stable Diffusion 3 / 3.5: teach the model a subject from a few images, by full
fine-tuning or LoRA, optionally with prior preservation and text-encoder training.

    accelerate launch train_dreambooth_sd3.py \
      --pretrained_model_name_or_path=stabilityai/stable-diffusion-3-medium-diffusers \
      --instance_data_dir=dog --output_dir=trained-sd3 --mixed_precision="fp16" \
      --instance_prompt="a photo of sks dog" --resolution=1024 --train_batch_size=1 \
      --gradient_accumulation_steps=4 --learning_rate=1e-4 --lr_scheduler="constant" \
      --lr_warmup_steps=0 --max_train_steps=500 --validation_prompt="A photo of sks dog in a bucket" \
      --validation_epochs=25 --seed="0"

Add `--use_lora --rank 32 [--lora_blocks "12,13,14"] [--lora_layers attn.to_k,attn.to_q,attn.to_v,attn.to_out.0]`
for LoRA, `--with_prior_preservation --class_data_dir=dogs --class_prompt="a photo of dog"` for
prior preservation, `--train_text_encoder` to train the CLIP encoders too. The flags of diffusers'
train_dreambooth_sd3.py and train_dreambooth_lora_sd3.py work unchanged.
"""

from __future__ import annotations

import argparse
from functools import partial

from sdft import checks, cli, output, trainer
from sdft.builders import build, config_data, dreambooth_data, flow_objective
from sdft.families.sd3 import StableDiffusion3
from sdft.training_run import Run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_model_args(parser)
    cli.add_dreambooth_args(parser)
    cli.add_image_args(parser)
    cli.add_kohya_data_args(parser)
    cli.add_latent_cache_args(parser)
    cli.add_training_args(parser)
    cli.add_text_encoder_optimizer_args(parser)
    cli.add_optimizer_args(parser, choice=True)
    cli.add_memory_args(parser)
    cli.add_quantization_args(parser)
    cli.add_precision_args(parser, xformers=False)
    cli.add_flow_objective_args(parser)
    cli.add_flow_recipe_args(parser)
    cli.add_loss_type_args(parser)
    cli.add_sd3_text_args(parser)
    cli.add_pos_embed_args(parser)
    cli.add_ema_args(parser, offload=True, non_ema_revision=False)
    cli.add_sd3_lora_args(parser)
    cli.add_subject_args(parser)
    cli.add_single_file_args(parser)
    cli.add_bucket_args(parser, multiple=checks.SD3_LATENT_MULTIPLE)
    cli.add_validation_loss_args(parser, dreambooth=True)
    cli.add_checkpoint_args(parser)
    cli.add_divergence_args(parser)
    cli.add_validation_args(parser, prompt_list=False)
    cli.add_sd3_sample_args(parser)
    cli.add_logging_args(parser, project_flag=False)
    cli.add_hub_args(parser)
    parser.set_defaults(output_dir="sd3-dreambooth", resolution=512, train_batch_size=4, num_train_epochs=1,
                        validation_epochs=50, adam_weight_decay=1e-04, caption_column=None)
    return parser


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    return cli.parse(build_parser(), input_args, [*checks.COMMON, partial(checks.check_base_file, family="sd3"),
                                                  partial(checks.check_network_args, family="sd3"),
                                                  checks.check_dreambooth, checks.check_sd3, checks.check_flow_recipes])


def main(args: argparse.Namespace) -> Run:
    family = StableDiffusion3(max_sequence_length=args.max_sequence_length, lora_layers=args.lora_layers,
                              lora_blocks=args.lora_blocks, apply_t5_attn_mask=args.apply_t5_attn_mask,
                              pos_emb_random_crop_rate=args.pos_emb_random_crop_rate)
    data = config_data if args.dataset_config else dreambooth_data
    with build(args, family, make_objective=flow_objective, make_data=data,
               tracker_name="dreambooth-sd3-lora" if args.use_lora else "dreambooth-sd3") as run:
        trainer.train(run)
        output.finish(run)
    return run  # finished; benchmarks/bench_train.py reads its timers (run.stats)


if __name__ == "__main__":
    cli.leave(cli.run(main, parse_args()))
