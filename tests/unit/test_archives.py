"""Archives as data folders: what is extracted, what is skipped, what is refused, and reuse."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

import pytest

from sdft.data.archives import extract_archive
from sdft.data.sources import DataError
from tests.subject_fixtures import PHOTOS, photo_zip


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_zip_extracts_images_and_captions_at_any_depth_and_skips_the_rest(tmp_path, caplog):
    archive = photo_zip(tmp_path / "photos.zip")
    with caplog.at_level("INFO"):
        folder = extract_archive(archive, tmp_path / "cache")
    assert files_under(folder) == {name for name, _ in PHOTOS} | {"caption.csv"}
    assert folder.parent == tmp_path / "cache" / "archives"
    # 4 __MACOSX resource forks + .DS_Store; notes.docx is neither image nor caption.
    assert "skipped 5 __MACOSX/hidden file(s) and 1 file(s)" in caplog.text


def test_unchanged_archive_is_reused_and_a_changed_one_extracted_afresh(tmp_path):
    archive = photo_zip(tmp_path / "photos.zip")
    first = extract_archive(archive, tmp_path / "cache")
    marker = first / "three.jpg"
    stamp = marker.stat().st_mtime_ns
    assert extract_archive(archive, tmp_path / "cache") == first
    assert marker.stat().st_mtime_ns == stamp, "a reused extraction is not rewritten"
    with zipfile.ZipFile(archive, "a") as handle:
        handle.writestr("extra.txt", "a new caption")
    second = extract_archive(archive, tmp_path / "cache")
    assert second != first and (second / "extra.txt").is_file()


def test_tar_gz_with_nested_folders(tmp_path):
    source = tmp_path / "src"
    (source / "a" / "b").mkdir(parents=True)
    (source / "a" / "b" / "x.png").write_bytes(b"png bytes")
    (source / "a" / "x.txt").write_text("a caption")
    archive = tmp_path / "set.tgz"
    with tarfile.open(archive, "w:gz") as handle:
        handle.add(source / "a", arcname="a")
    assert files_under(extract_archive(archive, tmp_path / "cache")) == {"a/b/x.png", "a/x.txt"}


def _zip_with(path: Path, name: str, data: bytes = b"x", mode: int | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as handle:
        handle.writestr("ok.png", b"fine")
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        handle.writestr(info, data)
    return path


@pytest.mark.parametrize("member", ["../../escaped.png", "/tmp/absolute-escape.png", "a/../../escaped.png"])
def test_zip_slip_is_refused_naming_the_member_and_writes_nothing(tmp_path, member):
    archive = _zip_with(tmp_path / "slip.zip", member)
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    with pytest.raises(DataError, match="outside the extraction folder") as err:
        extract_archive(archive, work / "cache")
    assert member in str(err.value)
    assert not (tmp_path / "escaped.png").exists() and not Path("/tmp/absolute-escape.png").exists()
    assert not any((work / "cache").rglob("*.png")), "nothing is left behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "slip.zip"]


def test_symlinks_and_hard_links_are_refused(tmp_path):
    archive = _zip_with(tmp_path / "link.zip", "photos/evil.png", b"/etc/passwd", mode=0o120777)
    with pytest.raises(DataError, match="'photos/evil.png' is a symlink or hard link"):
        extract_archive(archive, tmp_path / "cache")
    for kind, name in ((tarfile.SYMTYPE, "sym.png"), (tarfile.LNKTYPE, "hard.png")):
        tar = tmp_path / f"{name}.tar"
        with tarfile.open(tar, "w") as handle:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "../../outside.png"
            handle.addfile(info)
        with pytest.raises(DataError, match=f"'{name}' is a symlink or hard link"):
            extract_archive(tar, tmp_path / "cache")
    assert not any((tmp_path / "cache").rglob("*.png"))


def test_zip_bomb_and_too_many_members_are_refused(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("big.png", b"\0" * (4 << 20))   # 4 MiB of zeros deflate to ~4 KiB
    assert bomb.stat().st_size < 64 << 10
    with pytest.raises(DataError, match="zip bomb.*'big.png'"):
        extract_archive(bomb, tmp_path / "cache", max_total_bytes=1 << 20)
    with pytest.raises(DataError, match="more than the limit of 1"):
        extract_archive(_zip_with(tmp_path / "many.zip", "b.png"), tmp_path / "cache", max_members=1)
    assert not any((tmp_path / "cache").rglob("*.png"))


def test_member_larger_than_its_header_is_refused(tmp_path):
    archive = _zip_with(tmp_path / "liar.zip", "liar.png", b"y" * 1000)
    data = bytearray(archive.read_bytes())
    # Patch the central directory's uncompressed size of liar.png (stored: sizes sit at fixed offsets).
    central = data.rfind(b"PK\x01\x02")
    data[central + 24:central + 28] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match="liar.png"):
        extract_archive(archive, tmp_path / "cache")
    assert not any((tmp_path / "cache").rglob("liar.png"))
