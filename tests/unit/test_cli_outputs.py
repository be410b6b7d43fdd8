"""The output flags (--output_kohya_format, --save_single_file, --save_precision) fail at start-up,
naming the flag, where they cannot apply."""

from __future__ import annotations

import pytest

import train_dreambooth_sd3 as sd3
import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl
from tests.unit.test_cli_errors import base, data_dir, db_base, model_dir, parse_error, workdir  # noqa: F401

SCRIPTS = {"t2i": t2i, "sdxl": sdxl, "sd3": sd3}


def command(script: str, base, db_base) -> list[str]:  # noqa: F811
    return list(db_base if script == "sd3" else base)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_single_file_with_lora_is_refused(script, base, db_base, capsys):  # noqa: F811
    err = parse_error(command(script, base, db_base) + ["--use_lora", "--save_single_file"], capsys,
                      script=SCRIPTS[script])
    assert "--save_single_file" in err and "--use_lora" in err


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_save_precision_without_single_file_is_refused(script, base, db_base, capsys):  # noqa: F811
    err = parse_error(command(script, base, db_base) + ["--save_precision=fp16"], capsys, script=SCRIPTS[script])
    assert "--save_precision" in err and "--save_single_file" in err


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_single_file_with_a_precision_parses(script, base, db_base):  # noqa: F811
    args = SCRIPTS[script].parse_args(command(script, base, db_base) + ["--save_single_file", "--save_precision=bf16"])
    assert (args.save_single_file, args.save_precision) == (True, "bf16")


def test_kohya_format_needs_lora_in_the_sd1_script_too(base, capsys):  # noqa: F811
    assert "--use_lora" in parse_error(base + ["--output_kohya_format"], capsys, script=t2i)
    assert t2i.parse_args(base + ["--use_lora", "--output_kohya_format"]).output_kohya_format


def test_kohya_format_needs_lora_in_the_sd3_script_too(db_base, capsys):  # noqa: F811
    # SD3's kohya/LyCORIS file names the transformer's layers lora_transformer_* (tests/integration/test_sd3_adapters.py).
    assert "--use_lora" in parse_error(db_base + ["--output_kohya_format"], capsys, script=sd3)
    assert sd3.parse_args(db_base + ["--use_lora", "--output_kohya_format"]).output_kohya_format
