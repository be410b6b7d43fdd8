"""FSDP2 / DeepSpeed configuration: what accelerate's launcher hands the processes is read back,
and what a sharded run cannot do is refused at parse time, naming the flags. (The sharded runs
themselves are in tests/integration/test_sharded_training.py; DeepSpeed cannot run on this CPU.)"""

from __future__ import annotations

import json

import pytest

from sdft.sharding import DEEPSPEED, FSDP, EngineConfig, RunShape, refusals


def launcher_environment(*flags: str) -> dict[str, str]:
    """The environment `accelerate launch <flags> script.py` gives the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args([*flags, "--num_processes", "2", "--main_process_port", "0",
                                               "train.py"])
    args, _, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ""   # set by launch_command before it prepares
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_stages_from_the_launcher_are_read(stage):
    config = EngineConfig.from_environ(launcher_environment("--use_deepspeed", "--zero_stage", str(stage)))
    assert (config.engine, config.zero_stage) == (DEEPSPEED, stage)
    assert config.describe() == f"DeepSpeed ZeRO-{stage}"


def test_a_deepspeed_config_file_gives_the_stage(tmp_path):
    file = tmp_path / "ds.json"
    file.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True},
                                "train_micro_batch_size_per_gpu": "auto"}))
    config = EngineConfig.from_environ(launcher_environment("--use_deepspeed", "--deepspeed_config_file", str(file)))
    assert (config.engine, config.zero_stage, config.deepspeed_config) == (DEEPSPEED, 2, str(file))


def test_fsdp2_from_the_launcher_is_read_and_fsdp1_is_refused():
    config = EngineConfig.from_environ(launcher_environment("--use_fsdp", "--fsdp_version", "2"))
    assert (config.engine, config.fsdp_version, config.state_dict_type) == (FSDP, 2, "SHARDED_STATE_DICT")
    assert refusals(config, RunShape(lora=True)) == []
    old = EngineConfig.from_environ(launcher_environment("--use_fsdp", "--fsdp_version", "1"))
    assert any("--fsdp_version 2" in problem for problem in refusals(old, RunShape()))


def test_refusals_name_the_flags_and_the_engine():
    zero3 = EngineConfig(DEEPSPEED, zero_stage=3)
    found = " ".join(refusals(zero3, RunShape(lora=True, ema=True, text_encoders=True, fused_backward=True,
                                              single_file=True, held_out_loss=True)))
    for flag in ("--use_lora", "--use_ema", "--train_text_encoder", "--fused_backward_pass", "--save_single_file",
                 "--validation_split", "ZeRO-3"):
        assert flag in found
    assert refusals(EngineConfig(DEEPSPEED, zero_stage=2), RunShape(lora=True)) == []   # LoRA under ZeRO-2 runs
    assert refusals(EngineConfig(), RunShape(lora=True, ema=True)) == []                 # DDP: nothing to refuse



def test_fingerprints_change_with_any_file_and_disagreements_name_the_processes(tmp_path):
    from sdft.agreement import disagreements, fingerprint, model_files

    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "notes").mkdir()
    (model / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"], "_class_name": "x"}')
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(bytes(3 << 20))
    assert model_files(model) == [model / "model_index.json", model / "unet"]   # not the folders it does not name
    before = fingerprint(*model_files(model))
    (model / "notes" / "a.txt").write_text("beside the model")
    assert fingerprint(*model_files(model)) == before
    with weights.open("r+b") as handle:
        handle.seek((3 << 20) - 10)
        handle.write(b"x")   # the tail of a large file
    after = fingerprint(*model_files(model))
    assert after != before

    seen = [{"the model files": before, "the data": "d"}, {"the model files": after, "the data": "d"}]
    assert disagreements(seen) == [f"the model files (process 0: {before}, process 1: {after})"]
    assert disagreements(seen[:1] * 2) == []


def test_one_process_owns_its_output_folder(tmp_path, accelerator):
    from sdft.nodes import Layout, output_layout

    assert output_layout(accelerator, tmp_path / "out") == Layout.single()


def test_a_marker_written_a_moment_later_still_counts_as_shared(tmp_path):
    import threading

    from sdft.nodes import appears

    marker = tmp_path / "marker"
    threading.Timer(0.3, marker.write_text, args=("x",)).start()
    assert appears(marker, seconds=3)
    assert not appears(tmp_path / "never", seconds=0.3)


def test_deepspeed_without_the_package_names_the_install(monkeypatch):
    import argparse
    import importlib.util

    from sdft.checks import check_sharding
    from sdft.errors import CliError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    flags = dict(use_lora=True, use_ema=False, fused_backward_pass=False, train_text_encoder=False,
                 train_text_encoder_ti=False, save_single_file=False, validation_split=0.0, validation_data_dir=None)
    with pytest.raises(CliError, match=r"pip install deepspeed==0\.19\.8"):
        check_sharding(argparse.Namespace(**flags), set())


def test_what_writes_once_for_all_machines_is_refused_without_a_shared_folder(tmp_path):
    from sdft.errors import CliError
    from sdft.nodes import refuse_unshared

    refuse_unshared(tmp_path, {"--caption_model": False})
    with pytest.raises(CliError, match="not shared between the machines, which --caption_model"):
        refuse_unshared(tmp_path, {"--caption_model": True, "FSDP2": False})
