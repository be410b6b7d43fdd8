"""Bad inputs met after parsing stop the run early, with a message naming the file or flag, and
never touch what earlier runs wrote. These run the real entry point in-process (no model is
loaded before the failure, so they are quick)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import train_text_to_image as t2i
from sdft.trainer import run
from tests.integration.conftest import sd_args

pytestmark = pytest.mark.integration


@pytest.fixture()
def earlier_run(tmp_path) -> Path:
    """An output folder holding a checkpoint from an earlier run."""
    out = tmp_path / "out"
    (out / "checkpoint-2" / "unet").mkdir(parents=True)
    (out / "checkpoint-2" / "unet" / "config.json").write_text("{}")
    return out


@pytest.fixture(autouse=True)
def _reset_accelerate(fresh_accelerate_state):
    yield


def run_script(argv: list, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = run(t2i.main, t2i.parse_args([str(a) for a in argv]))
    return code, capsys.readouterr().err


def test_corrupt_image_is_named_and_earlier_checkpoints_survive(tiny_sd, image_folder, earlier_run, tmp_path,
                                                                monkeypatch, capsys):
    data = tmp_path / "images"
    shutil.copytree(image_folder, data)
    metadata = (data / "metadata.jsonl").read_text()
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (data / "metadata.jsonl").write_text(metadata + '{"file_name": "broken.png", "text": "a broken image"}\n')

    code, err = run_script(sd_args(tiny_sd, data, earlier_run, "--max_train_steps", "2"), monkeypatch, capsys)
    assert code == 1
    assert "broken.png" in err
    assert (earlier_run / "checkpoint-2" / "unet" / "config.json").is_file()
    assert {p.name for p in earlier_run.iterdir()} == {"checkpoint-2"}, "nothing else may be written"


def test_unknown_caption_column_lists_the_real_columns(tiny_sd, image_folder, earlier_run, monkeypatch, capsys):
    code, err = run_script(sd_args(tiny_sd, image_folder, earlier_run, "--caption_column", "caption"),
                           monkeypatch, capsys)
    assert code == 1
    assert "--caption_column 'caption'" in err and "text" in err


def test_missing_caption_file_is_named(tiny_sd, tmp_path, earlier_run, monkeypatch, capsys):
    from sdft.tiny import make_images

    data = make_images(tmp_path / "captions", num_images=3, layout="captions")
    missing = sorted(data.glob("*.txt"))[1]
    missing.unlink()
    code, err = run_script(sd_args(tiny_sd, data, earlier_run), monkeypatch, capsys)
    assert code == 1 and missing.with_suffix("").name in err


def test_push_to_hub_without_network_fails_before_training(tiny_sd, image_folder, earlier_run, monkeypatch, capsys):
    code, err = run_script(sd_args(tiny_sd, image_folder, earlier_run, "--push_to_hub", "--max_train_steps", "2"),
                           monkeypatch, capsys)
    assert code == 1 and "--push_to_hub" in err
    assert {p.name for p in earlier_run.iterdir()} == {"checkpoint-2"}
