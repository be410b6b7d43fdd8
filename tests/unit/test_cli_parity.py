"""The command line of each script is a contract with diffusers' example scripts.

Every flag of the matching diffusers script must exist here with the same option string, dest,
type, default, nargs, choices, action and required flag, and every flag of its LoRA sibling must
exist too (defaults may differ only where the two upstream scripts disagree). The reference lists
live in `../shared/reference/flags/` beside the repository.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import train_dreambooth_sd3 as sd3
import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl

REFERENCE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "flags"
FIELDS = ("dest", "type", "default", "nargs", "choices", "action", "required")
# script module -> (its diffusers reference, {sibling reference: flags whose defaults may differ}).
# Where a script and its LoRA sibling disagree, the full fine-tune script's default wins.
CONTRACTS = {
    "t2i": (t2i, "train_text_to_image.json", {"train_text_to_image_lora.json": {"output_dir", "validation_epochs"}}),
    "sdxl": (sdxl, "train_text_to_image_sdxl.json", {"train_text_to_image_lora_sdxl.json": {"output_dir"}}),
    "sd3": (sd3, "train_dreambooth_sd3.json", {"train_dreambooth_lora_sd3.json": set()}),
}
# Deliberate, documented deviations: (script, flag) -> fields that differ from the reference.
DEVIATIONS = {
    # upstream's type=bool parses "False" as True; ours parses true/false.
    ("sd3", "--prodigy_decouple"): {"type"},
    ("sd3", "--prodigy_use_bias_correction"): {"type"},
    ("sd3", "--prodigy_safeguard_warmup"): {"type"},
    # 'none' (uniform timesteps, weight 1) added to the choices.
    ("sd3", "--weighting_scheme"): {"choices"},
}
# Single flags taken from another diffusers script: (script, reference file, flag).
BORROWED = [(script, "train_dreambooth_lora_sdxl.json", flag) for script in ("t2i", "sdxl")
            for flag in ("--output_kohya_format", "--use_dora", "--lora_dropout")]
# DreamBooth data and pivotal tuning in the SD 1.x and SDXL scripts, as diffusers' advanced SDXL
# DreamBooth script declares them (--instance_prompt too, except that it is optional here: the
# scripts also train on captioned images without it).
PIVOTAL_FLAGS = ["--instance_data_dir", "--class_data_dir", "--class_prompt", "--with_prior_preservation",
                 "--prior_loss_weight", "--num_class_images", "--sample_batch_size", "--repeats",
                 "--prior_generation_precision", "--train_text_encoder_ti", "--token_abstraction",
                 "--num_new_tokens_per_abstraction", "--train_text_encoder_ti_frac"]
BORROWED += [(script, "train_dreambooth_lora_sdxl_advanced.json", flag) for script in ("t2i", "sdxl")
             for flag in PIVOTAL_FLAGS]


def load_reference(name: str) -> list[dict]:
    path = REFERENCE_DIR / name
    if not path.is_file():
        pytest.skip(f"reference flag list {path} not found (CI checks out ../shared/reference beside the repo)")
    flags = json.loads(path.read_text())["flags"]
    assert len(flags) > 30, f"{path} lists only {len(flags)} flags; the reference looks truncated"
    return flags


def type_name(kind) -> str | None:
    return None if kind is None else getattr(kind, "__name__", repr(kind))


def describe(parser: argparse.ArgumentParser, action: argparse.Action) -> dict:
    return {
        "dest": action.dest,
        "type": type_name(action.type),
        "default": parser.get_default(action.dest),
        "nargs": action.nargs,
        "choices": list(action.choices) if action.choices is not None else None,
        "action": type(action).__name__,
        "required": action.required,
    }


def actions_by_flag(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


def same(expected, actual) -> bool:
    # A bool default must stay a bool, and 0 must not silently become False (or the reverse).
    return expected == actual and isinstance(expected, bool) == isinstance(actual, bool)


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return t2i.build_parser()


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "base-model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    from sdft.tiny import make_images

    return make_images(tmp_path / "images", num_images=2)


@pytest.mark.parametrize("script", sorted(CONTRACTS))
def test_every_reference_flag_matches(script):
    module, reference_file, _ = CONTRACTS[script]
    parser = module.build_parser()
    reference = load_reference(reference_file)
    actions = actions_by_flag(parser)
    missing = [ref["flag"] for ref in reference if ref["flag"] not in actions]
    assert not missing, f"flags of diffusers' {reference_file} missing from our parser: {missing}"
    mismatches = {}
    for ref in reference:
        ours = describe(parser, actions[ref["flag"]])
        allowed = DEVIATIONS.get((script, ref["flag"]), set())
        diff = {field: {"reference": ref[field], "ours": ours[field]}
                for field in FIELDS if field not in allowed and not same(ref[field], ours[field])}
        if diff:
            mismatches[ref["flag"]] = diff
    assert not mismatches, f"flags that differ from diffusers' {reference_file}: {mismatches}"


@pytest.mark.parametrize("script", sorted(CONTRACTS))
def test_every_lora_flag_exists_with_only_the_agreed_default_differences(script):
    module, reference_file, siblings = CONTRACTS[script]
    parser = module.build_parser()
    [(sibling_file, allowed)] = siblings.items()
    lora = load_reference(sibling_file)
    full = {ref["dest"]: ref for ref in load_reference(reference_file)}
    actions = actions_by_flag(parser)
    missing = [ref["flag"] for ref in lora if ref["flag"] not in actions]
    assert not missing, f"flags of diffusers' {sibling_file} missing from our parser: {missing}"
    mismatches, default_differs = {}, {}
    for ref in lora:
        ours = describe(parser, actions[ref["flag"]])
        skip = {"default"} | DEVIATIONS.get((script, ref["flag"]), set())
        diff = {field: {"reference": ref[field], "ours": ours[field]}
                for field in FIELDS if field not in skip and not same(ref[field], ours[field])}
        if diff:
            mismatches[ref["flag"]] = diff
        if not same(ref["default"], ours["default"]):
            default_differs[ref["dest"]] = ours["default"]
    assert not mismatches, f"LoRA flags that differ from diffusers' {sibling_file}: {mismatches}"
    assert set(default_differs) == allowed
    for dest in allowed:
        assert same(full[dest]["default"], default_differs[dest]), (
            f"--{dest} default should be the full fine-tune script's {full[dest]['default']!r}, "
            f"got {default_differs[dest]!r}")


@pytest.mark.parametrize("script, reference_file, flag", BORROWED)
def test_borrowed_flags_match_their_source(script, reference_file, flag):
    parser = CONTRACTS[script][0].build_parser()
    [ref] = [r for r in load_reference(reference_file) if r["flag"] == flag]
    ours = describe(parser, actions_by_flag(parser)[flag])
    assert {f: ref[f] for f in FIELDS} == ours


@pytest.mark.parametrize("script", ["t2i", "sdxl"])
def test_instance_prompt_is_the_advanced_scripts_but_optional(script):
    parser = CONTRACTS[script][0].build_parser()
    [ref] = [r for r in load_reference("train_dreambooth_lora_sdxl_advanced.json") if r["flag"] == "--instance_prompt"]
    ours = describe(parser, actions_by_flag(parser)["--instance_prompt"])
    assert {f: ref[f] for f in FIELDS if f != "required"} == {f: ours[f] for f in FIELDS if f != "required"}
    assert ref["required"] is True and ours["required"] is False


def test_deviations_are_the_documented_ones():
    parser = sd3.build_parser()
    actions = actions_by_flag(parser)
    assert actions["--prodigy_decouple"].type("False") is False
    assert "none" in actions["--weighting_scheme"].choices


def test_minimal_command_line_gets_the_reference_defaults(model_dir, image_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    reference = load_reference("train_text_to_image.json")
    args = t2i.parse_args([f"--pretrained_model_name_or_path={model_dir}", "--train_data_dir", str(image_dir)])
    assert args.pretrained_model_name_or_path == str(model_dir)
    assert args.train_data_dir == str(image_dir)
    given = {"pretrained_model_name_or_path", "train_data_dir"}
    wrong = {ref["dest"]: {"reference": ref["default"], "parsed": getattr(args, ref["dest"], "<missing>")}
             for ref in reference
             if ref["dest"] not in given and not same(ref["default"], getattr(args, ref["dest"], "<missing>"))}
    assert not wrong, f"parsed defaults differ from diffusers' train_text_to_image.py: {wrong}"


def test_documented_diffusers_command_line_parses_unchanged(model_dir, tmp_path, monkeypatch):
    # The naruto example from diffusers' examples/text_to_image/README.md (and this script's docstring).
    monkeypatch.chdir(tmp_path)
    args = t2i.parse_args([
        f"--pretrained_model_name_or_path={model_dir}",
        "--dataset_name=lambdalabs/naruto-blip-captions",
        "--use_ema", "--resolution=512", "--center_crop", "--random_flip",
        "--train_batch_size=1", "--gradient_accumulation_steps=4", "--gradient_checkpointing",
        "--max_train_steps=15000", "--learning_rate=1e-05", "--max_grad_norm=1",
        "--lr_scheduler=constant", "--lr_warmup_steps=0", "--output_dir=sd-naruto-model",
    ])
    assert args.dataset_name == "lambdalabs/naruto-blip-captions"   # a Hub id: checked when loaded
    assert args.train_data_dir is None
    assert (args.use_ema, args.center_crop, args.random_flip, args.gradient_checkpointing) == (True, True, True, True)
    assert (args.resolution, args.train_batch_size, args.gradient_accumulation_steps) == (512, 1, 4)
    assert args.max_train_steps == 15000 and args.lr_warmup_steps == 0
    assert args.learning_rate == pytest.approx(1e-5) and args.max_grad_norm == 1.0
    assert args.lr_scheduler == "constant" and args.output_dir == "sd-naruto-model"
    assert args.use_lora is False


def test_documented_lora_command_line_parses_with_use_lora(model_dir, tmp_path, monkeypatch):
    # diffusers' README_lora.md example (minus --report_to=wandb), plus --use_lora as our docstring says.
    monkeypatch.chdir(tmp_path)
    args = t2i.parse_args([
        f"--pretrained_model_name_or_path={model_dir}",
        "--dataset_name=lambdalabs/naruto-blip-captions", "--caption_column=text",
        "--resolution=512", "--random_flip", "--train_batch_size=1", "--num_train_epochs=100",
        "--checkpointing_steps=5000", "--learning_rate=1e-04", "--lr_scheduler=constant",
        "--lr_warmup_steps=0", "--seed=42", "--output_dir=sd-naruto-model-lora",
        "--validation_prompt=cute dragon creature", "--use_lora", "--rank", "4",
    ])
    assert args.use_lora is True and args.rank == 4
    assert args.validation_prompt == "cute dragon creature" and args.seed == 42
    assert args.checkpointing_steps == 5000 and args.num_train_epochs == 100


def test_help_lists_every_reference_flag(capsys):
    reference = load_reference("train_text_to_image.json")
    with pytest.raises(SystemExit) as exc:
        t2i.parse_args(["--help"])
    assert exc.value.code == 0
    shown = capsys.readouterr().out
    absent = [ref["flag"] for ref in reference if ref["flag"] not in shown]
    assert not absent, f"--help does not show: {absent}"
