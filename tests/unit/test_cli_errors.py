"""A bad command line stops at parse time (exit code 2, like argparse) with a message naming the flag."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import train_text_to_image as t2i
from sdft import cli


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch) -> Path:
    # Relative defaults such as --output_dir=sd-model-finetuned must not see the repo's files.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return tmp_path


@pytest.fixture()
def model_dir(workdir: Path) -> Path:
    folder = workdir / "base-model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


@pytest.fixture()
def data_dir(workdir: Path) -> Path:
    from sdft.tiny import make_images

    return make_images(workdir / "images", num_images=2)


@pytest.fixture()
def base(model_dir: Path, data_dir: Path) -> list[str]:
    return [f"--pretrained_model_name_or_path={model_dir}", f"--train_data_dir={data_dir}"]


def parse_error(argv: list[str], capsys, script=t2i) -> str:
    """Parse with `script`'s parser, expect argparse's exit code 2, return stderr."""
    with pytest.raises(SystemExit) as exc:
        script.parse_args(argv)
    assert exc.value.code == 2, f"expected a usage error (exit 2) for {argv}, got exit code {exc.value.code}"
    err = capsys.readouterr().err
    assert "error:" in err
    return err


def test_minimal_command_line_parses(base, model_dir, data_dir):
    args = t2i.parse_args(base)
    assert (args.pretrained_model_name_or_path, args.train_data_dir) == (str(model_dir), str(data_dir))


def test_no_dataset(model_dir, capsys):
    err = parse_error([f"--pretrained_model_name_or_path={model_dir}"], capsys)
    assert "--dataset_name" in err and "--train_data_dir" in err


def test_train_data_dir_that_does_not_exist(model_dir, workdir, capsys):
    missing = workdir / "no-such-images"
    err = parse_error([f"--pretrained_model_name_or_path={model_dir}", f"--train_data_dir={missing}"], capsys)
    assert "--train_data_dir" in err and str(missing) in err


def test_missing_model_is_required(data_dir, capsys):
    err = parse_error([f"--train_data_dir={data_dir}"], capsys)
    assert "--pretrained_model_name_or_path" in err


@pytest.mark.parametrize("spelling", ["absolute", "relative"])
def test_local_model_folder_that_does_not_exist(data_dir, workdir, capsys, spelling):
    missing = str(workdir / "no-such-model") if spelling == "absolute" else "./no-such-model"
    err = parse_error([f"--pretrained_model_name_or_path={missing}", f"--train_data_dir={data_dir}"], capsys)
    assert "--pretrained_model_name_or_path" in err and missing in err and "does not exist" in err


def test_damaged_single_file_checkpoint_is_not_reported_as_missing(data_dir, workdir, capsys):
    # Single files are bases too (issue 16); one that exists but cannot be read is named as damaged.
    single = workdir / "v1-5-pruned-emaonly.safetensors"
    single.write_bytes(b"\0" * 16)
    err = parse_error([f"--pretrained_model_name_or_path={single}", f"--train_data_dir={data_dir}"], capsys)
    assert "--pretrained_model_name_or_path" in err and str(single) in err
    assert "does not exist" not in err
    assert "is not a readable .safetensors file" in err


def test_model_folder_without_model_index(data_dir, workdir, capsys):
    folder = workdir / "just-a-unet"
    (folder / "unet").mkdir(parents=True)
    err = parse_error([f"--pretrained_model_name_or_path={folder}", f"--train_data_dir={data_dir}"], capsys)
    assert "--pretrained_model_name_or_path" in err and "model_index.json" in err and str(folder) in err


@pytest.mark.parametrize("spelling", [["--rank", "8"], ["--rank=8"], ["--rank", "4"]])
def test_rank_without_use_lora(base, capsys, spelling):
    # Even the default value, when typed, shows the user expected LoRA training.
    err = parse_error(base + spelling, capsys)
    assert "--rank" in err and "--use_lora" in err


def test_rank_with_use_lora_parses(base):
    args = t2i.parse_args(base + ["--use_lora", "--rank", "8"])
    assert args.use_lora is True and args.rank == 8


def test_use_ema_with_use_lora_parses(base):
    """EMA of the adapter weights (sdft.ema, adapter_only); tests/integration/test_adapter_ema.py runs it."""
    args = t2i.parse_args(base + ["--use_ema", "--use_lora"])
    assert args.use_ema and args.use_lora


def test_resume_from_checkpoint_pointing_nowhere(base, workdir, capsys):
    output = workdir / "out"
    (output / "checkpoint-5").mkdir(parents=True)
    err = parse_error(base + [f"--output_dir={output}", "--resume_from_checkpoint=checkpoint-7"], capsys)
    assert "--resume_from_checkpoint" in err and "checkpoint-7" in err


def test_resume_latest_without_checkpoints_parses(base, workdir):
    args = t2i.parse_args(base + [f"--output_dir={workdir / 'fresh'}", "--resume_from_checkpoint", "latest"])
    assert args.resume_from_checkpoint == "latest"


def test_resume_from_named_checkpoint_in_output_dir_parses(base, workdir):
    output = workdir / "out"
    (output / "checkpoint-5").mkdir(parents=True)
    args = t2i.parse_args(base + [f"--output_dir={output}", "--resume_from_checkpoint=checkpoint-5"])
    assert args.resume_from_checkpoint == "checkpoint-5"


def test_report_to_wandb_with_hub_token(base, capsys):
    err = parse_error(base + ["--report_to=wandb", "--hub_token=hf_secret"], capsys)
    assert "--report_to=wandb" in err and "--hub_token" in err


def test_report_to_wandb_without_wandb_installed(base, capsys):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    assert "pip install wandb" in parse_error(base + ["--report_to=wandb"], capsys)


def test_unknown_report_to(base, capsys):
    err = parse_error(base + ["--report_to=mlflw"], capsys)
    assert "--report_to" in err and "mlflw" in err and "tensorboard" in err


def test_unknown_lr_scheduler(base, capsys):
    err = parse_error(base + ["--lr_scheduler=cosine_annealing"], capsys)
    assert "--lr_scheduler" in err and "cosine_annealing" in err and "cosine_with_restarts" in err


def test_sample_prediction_is_not_supported_for_sd1(base, capsys):
    err = parse_error(base + ["--prediction_type=sample"], capsys)
    assert "--prediction_type" in err and "sample" in err and "v_prediction" in err


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_supported_prediction_types_parse(base, prediction_type):
    assert t2i.parse_args(base + [f"--prediction_type={prediction_type}"]).prediction_type == prediction_type


def test_snr_gamma_zero(base, capsys):
    err = parse_error(base + ["--snr_gamma=0"], capsys)
    assert "--snr_gamma" in err


def test_resolution_not_a_multiple_of_8(base, capsys):
    err = parse_error(base + ["--resolution=100"], capsys)
    assert "--resolution" in err and "100" in err and "8" in err


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_seed_outside_what_numpy_accepts(base, capsys, seed):
    # accelerate's set_seed seeds numpy, which only takes 0 <= seed < 2**32; "-1" is "random" in
    # other tools. Without a parse-time check the run dies later in a numpy traceback.
    err = parse_error(base + [f"--seed={seed}"], capsys)
    assert "--seed" in err


def test_train_batch_size_zero(base, capsys):
    err = parse_error(base + ["--train_batch_size=0"], capsys)
    assert "--train_batch_size" in err


def test_xformers_on_this_cpu_machine(base, capsys):
    import torch

    if importlib.util.find_spec("xformers") is not None and torch.cuda.is_available():
        pytest.skip("xformers and CUDA are both available here, so the flag is valid")
    err = parse_error(base + ["--enable_xformers_memory_efficient_attention"], capsys)
    assert "--enable_xformers_memory_efficient_attention" in err
    assert "pip install xformers" in err or "CUDA" in err


def test_dream_training_with_v_prediction(base, capsys):
    err = parse_error(base + ["--dream_training", "--prediction_type=v_prediction"], capsys)
    assert "--dream_training" in err and "v_prediction" in err


def test_dream_training_with_default_prediction_parses(base):
    assert t2i.parse_args(base + ["--dream_training"]).dream_training is True


# --------------------------------------------------------------------------- given_flags


def test_given_flags_tells_typed_flags_from_defaults():
    parser = t2i.build_parser()
    argv = ["--pretrained_model_name_or_path=some/model", "--rank", "4", "--center_crop",
            "--validation_prompts", "a cat", "a dog", "--resolution=512", "--learning_rate", "1e-4"]
    given = cli.given_flags(parser, argv)
    # Typed flags count even when the value equals the default (--rank 4, --resolution=512).
    assert given == {"pretrained_model_name_or_path", "rank", "center_crop", "validation_prompts",
                     "resolution", "learning_rate"}


def test_given_flags_of_an_empty_command_line_is_empty():
    assert cli.given_flags(t2i.build_parser(), []) == set()


def test_parse_hands_the_checks_the_typed_flags_and_fills_in_absent_ones(base):
    seen = []
    args = cli.parse(t2i.build_parser(), base + ["--random_flip", "--use_lora"],
                     [lambda args, given: seen.append(given)])
    assert seen == [{"pretrained_model_name_or_path", "train_data_dir", "random_flip", "use_lora"}]
    assert args.rank == 4
    # SD 1.x has no --learning_rate_te1 (SDXL's): the namespace says what its absence means.
    assert args.learning_rate_te1 is None and not any(name.startswith("_") for name in vars(args))


# --------------------------------------------------------------------------- SDXL


def sdxl_error(argv: list[str], capsys) -> str:
    import train_text_to_image_sdxl as sdxl

    return parse_error(argv, capsys, script=sdxl)


@pytest.mark.parametrize("extra, flag", [
    (["--timestep_bias_strategy=later", "--timestep_bias_multiplier=0"], "--timestep_bias_multiplier"),
    (["--timestep_bias_multiplier=-1"], "--timestep_bias_multiplier"),
    (["--timestep_bias_strategy=range", "--timestep_bias_begin=500", "--timestep_bias_end=400"],
     "--timestep_bias_begin"),
    (["--timestep_bias_strategy=earlier", "--timestep_bias_portion=0"], "--timestep_bias_portion"),
    (["--proportion_empty_prompts=1.5"], "--proportion_empty_prompts"),
    (["--output_kohya_format"], "--use_lora"),
    (["--learning_rate_te1=1e-4"], "--train_text_encoder"),
    (["--train_text_encoder", "--learning_rate_te2=-1"], "--learning_rate_te2"),
    (["--enable_npu_flash_attention"], "--enable_npu_flash_attention"),
    (["--pretrained_vae_model_name_or_path=./no-such-vae"], "--pretrained_vae_model_name_or_path"),
])
def test_sdxl_bad_flags(base, capsys, extra, flag):
    assert flag in sdxl_error(base + extra, capsys)


def test_sdxl_accepts_its_documented_command_line(base):
    import train_text_to_image_sdxl as sdxl

    args = sdxl.parse_args(base + [
        "--proportion_empty_prompts=0.2", "--train_batch_size=1", "--gradient_accumulation_steps=4",
        "--gradient_checkpointing", "--max_train_steps=10000", "--use_8bit_adam", "--learning_rate=1e-06",
        "--lr_scheduler=constant", "--lr_warmup_steps=0", "--mixed_precision=fp16", "--prediction_type=sample",
        "--validation_prompt=a cute Sundar Pichai creature", "--validation_epochs", "5",
        "--checkpointing_steps=5000", "--output_dir=sdxl-naruto-model", "--snr_gamma=5.0",
        "--timestep_bias_strategy=later", "--timestep_bias_portion=0.25",
        "--use_lora", "--rank", "8", "--train_text_encoder", "--output_kohya_format",
    ])
    assert (args.resolution, args.use_lora, args.rank, args.train_text_encoder) == (1024, True, 8, True)
    assert args.prediction_type == "sample" and args.timestep_bias_strategy == "later"


# --------------------------------------------------------------------------- SD3 DreamBooth


@pytest.fixture()
def db_base(model_dir: Path, workdir: Path) -> list[str]:
    from sdft.tiny import make_images

    instance = make_images(workdir / "dog", num_images=2, layout="images")
    return [f"--pretrained_model_name_or_path={model_dir}", f"--instance_data_dir={instance}",
            "--instance_prompt=a photo of sks dog"]


def sd3_error(argv: list[str], capsys) -> str:
    import train_dreambooth_sd3 as sd3

    return parse_error(argv, capsys, script=sd3)


@pytest.mark.parametrize("extra, flag", [
    (["--dataset_name=someone/dogs"], "--instance_data_dir"),
    (["--with_prior_preservation", "--class_data_dir=dogs"], "--class_prompt"),
    (["--with_prior_preservation", "--class_prompt=a dog"], "--class_data_dir"),
    (["--rank=32"], "--use_lora"),
    (["--lora_blocks=12,13"], "--use_lora"),
    (["--use_lora", "--lora_blocks=twelve"], "--lora_blocks"),
    (["--max_sequence_length=1024"], "--max_sequence_length"),
    (["--optimizer=sgd"], "--optimizer"),
    (["--weighting_scheme=logit-normal"], "--weighting_scheme"),
    (["--precondition_outputs=2"], "--precondition_outputs"),
    (["--prodigy_decouple=maybe"], "--prodigy_decouple"),
    (["--repeats=0"], "--repeats"),
])
def test_sd3_bad_flags(db_base, capsys, extra, flag):
    assert flag in sd3_error(db_base + extra, capsys)


def test_sd3_max_token_length_is_refused_with_the_reason_and_the_flag_to_use(db_base, capsys):
    err = sd3_error(db_base + ["--max_token_length=225"], capsys)
    assert "--max_token_length (75-token CLIP chunks) is for SD 1.x/2.x and SDXL" in err
    assert "raise --max_sequence_length" in err and "CLIP-L/G part stays one 77-token sequence" in err


def test_sd3_missing_instance_prompt(model_dir, workdir, capsys):
    assert "--instance_prompt" in sd3_error([f"--pretrained_model_name_or_path={model_dir}",
                                             f"--instance_data_dir={workdir}"], capsys)


def test_sd3_documented_command_lines_parse(db_base):
    import train_dreambooth_sd3 as sd3

    args = sd3.parse_args(db_base + [
        "--output_dir=trained-sd3", "--mixed_precision=fp16", "--resolution=1024", "--train_batch_size=1",
        "--gradient_accumulation_steps=4", "--learning_rate=1.0", "--report_to=tensorboard",
        "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_train_steps=500",
        "--validation_prompt=A photo of sks dog in a bucket", "--validation_epochs=25", "--seed=0",
        "--use_lora", "--rank", "32", "--lora_blocks", "12,13,14",
        "--lora_layers", "attn.to_k,attn.to_q,attn.to_v,attn.to_out.0",
        "--train_text_encoder", "--text_encoder_lr=1.0", "--optimizer=prodigy", "--prodigy_decouple=False",
        "--max_sequence_length=512", "--cache_latents", "--weighting_scheme=none",
    ])
    assert (args.rank, args.lora_blocks, args.max_sequence_length) == (32, "12,13,14", 512)
    assert args.prodigy_decouple is False and args.optimizer == "prodigy" and args.caption_column is None
    assert (args.train_batch_size, args.num_train_epochs, args.validation_epochs) == (1, 1, 25)


@pytest.mark.parametrize("value", ["0", "1", "1.5"])
def test_ema_decay_outside_zero_one_names_the_flag(base, value, capsys):
    assert "--ema_decay" in parse_error(base + ["--use_ema", f"--ema_decay={value}"], capsys)


def test_ema_decay_reaches_the_average():
    import torch

    from sdft.ema import EMA

    model = torch.nn.Linear(2, 2)
    model.config = {}
    assert EMA({"unet": model}, torch.device("cpu"), decay=0.995).averages["unet"].decay == 0.995


# --------------------------------------------------------------------------- sample sets (README, Samples)


def test_a_bad_prompt_file_line_stops_the_parse_naming_file_and_line(base, workdir, capsys):
    prompts = workdir / "prompts.txt"
    prompts.write_text("a red circle --w 64\na blue square --h 48 --cfg 7\n")
    err = parse_error(base + ["--sample_prompts", str(prompts)], capsys)
    assert f"--sample_prompts {prompts}: line 2: unknown option --cfg" in err


def test_sample_flags_parse_and_bad_values_name_the_flag(base, workdir, capsys):
    prompts = workdir / "prompts.txt"
    prompts.write_text("a red circle --ss dpm++ 2m karras\n")
    args = t2i.parse_args(base + ["--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--sample_at_first",
                                  "--sample_sampler", "Euler_A", "--ddp_timeout", "90"])
    assert (args.sample_every_n_steps, args.sample_at_first, args.sample_sampler, args.ddp_timeout) == \
        (2, True, "Euler_A", 90)
    assert "--sample_sampler: unknown sampler 'dpm++ 9m'" in parse_error(base + ["--sample_sampler", "dpm++ 9m"], capsys)
    assert "--ddp_timeout must be at least 1" in parse_error(base + ["--ddp_timeout", "0"], capsys)
    assert "use --sample_every_n_epochs" in parse_error(base + ["--validation_epochs", "2", "--validation_steps", "4"],
                                                         capsys)


def test_sd3_prompt_files_take_flow_samplers_only(workdir, capsys):
    import train_dreambooth_sd3 as sd3
    from sdft.tiny import make_images

    model = workdir / "sd3"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    prompts = workdir / "prompts.txt"
    prompts.write_text("a photo of sks dog --ss dpm++ 2m\n")
    argv = [f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={make_images(workdir / 'dog', 2)}",
            "--instance_prompt=a photo of sks dog", "--sample_prompts", str(prompts)]
    assert "line 1: unknown flow-matching (SD3) sampler 'dpm++ 2m'" in parse_error(argv, capsys, sd3)
    prompts.write_text("a photo of sks dog --ss heun --w 48\n")
    assert sd3.parse_args(argv + ["--sample_slg", "7,8,9"]).sample_slg == "7,8,9"
    assert "--sample_slg must be comma-separated" in parse_error(argv + ["--sample_slg", "7;8"], capsys, sd3)


@pytest.mark.parametrize("flags, named", [
    (["--base_precision", "int8"], "--base_precision int8"),                     # full fine-tune of the UNet
    (["--fp8_base_unet"], "--fp8_base_unet"),
    (["--use_lora", "--base_precision", "nf4", "--full_bf16", "--mixed_precision", "bf16"], "--full_bf16"),
    (["--use_lora", "--fp8_base", "--base_precision", "int8"], "--fp8_base"),
    (["--text_encoder_precision", "fp8", "--train_text_encoder"], "--text_encoder_precision fp8"),
])
def test_quantized_base_refusals_name_the_flags(base, flags, named, capsys):
    """A quantized weight cannot be trained, and --full_bf16 is for full fine-tunes: refused at parse time."""
    err = parse_error(base + flags, capsys)
    assert named in err and ("--use_lora" in err or "--full_bf16" in err or "contradicts" in err), err


def test_quantized_base_without_torchao_names_the_pip_install(base, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    err = parse_error(base + ["--use_lora", "--base_precision", "int8"], capsys)
    assert "--base_precision int8 needs torchao" in err and "pip install -r requirements-quantization.txt" in err
