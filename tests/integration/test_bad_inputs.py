"""Bad inputs met after parsing stop the run early, with a message naming the file or flag, and
never touch what earlier runs wrote. These run the real entry point in-process (no model is
loaded before the failure, so they are quick)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import train_text_to_image as t2i
from sdft.cli import run
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


def truncated_jpeg(path: Path) -> Path:
    from PIL import Image

    Image.effect_noise((128, 128), 50).convert("RGB").save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])   # headers intact: verify() passes it
    return path


def truncated_png(path: Path) -> Path:
    from PIL import Image

    Image.effect_noise((64, 64), 50).convert("RGB").save(path, format="PNG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def bomb_png(path: Path) -> Path:
    """A PNG whose header claims 50000 x 50000 pixels (Pillow refuses more than 2 x 89 Mpx)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("make_bad", [truncated_jpeg, truncated_png, bomb_png],
                         ids=["truncated-jpeg", "truncated-png", "bomb-png"])
def test_unreadable_images_found_at_start_up(make_bad, tiny_sd, tmp_path, earlier_run, monkeypatch, capsys):
    from sdft.tiny import make_images

    data = make_images(tmp_path / "captions", num_images=3, layout="captions")
    bad = make_bad(data / ("zz_bad.jpg" if make_bad is truncated_jpeg else "zz_bad.png"))
    assert bad.stat().st_size > 0
    bad.with_suffix(".txt").write_text("a bad image")
    code, err = run_script(sd_args(tiny_sd, data, earlier_run, "--max_train_steps", "2"), monkeypatch, capsys)
    assert code == 1 and bad.name in err
    assert {p.name for p in earlier_run.iterdir()} == {"checkpoint-2"}


def test_caption_file_that_is_not_utf8_is_named(tiny_sd, tmp_path, earlier_run, monkeypatch, capsys):
    from sdft.tiny import make_images

    data = make_images(tmp_path / "captions", num_images=2, layout="captions")
    caption = sorted(data.glob("*.txt"))[0]
    caption.write_bytes("une photo d'un caf\u00e9".encode("latin-1"))
    code, err = run_script(sd_args(tiny_sd, data, earlier_run), monkeypatch, capsys)
    assert code == 1 and caption.name in err and "UTF-8" in err


def test_fp16_on_the_cpu_says_it_needs_a_gpu(tiny_sd, image_folder, earlier_run, monkeypatch, capsys):
    code, err = run_script(sd_args(tiny_sd, image_folder, earlier_run, "--mixed_precision", "fp16"), monkeypatch, capsys)
    assert code == 1 and "needs a GPU" in err and "bf16" in err
    assert {p.name for p in earlier_run.iterdir()} == {"checkpoint-2"}
