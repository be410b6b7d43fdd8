"""Archives (.zip, .tar, .tar.gz, .tgz) as data folders, extracted safely and once.

An archive is extracted into `<output_dir>/.sdft-cache/archives/<name>-<digest>/`, where the
digest is the SHA-256 of the archive's bytes, so an unchanged archive is reused and a changed
one is extracted afresh. Members are checked before anything is written:

- a path that is absolute, or climbs out with `..`, or a symlink or hard link, is refused with an
  error naming the member (a "zip-slip" archive could otherwise overwrite any file the user can);
- the member count and the total uncompressed size are bounded (a zip bomb is refused);
- `__MACOSX/` entries and dotfiles (macOS resource forks, `.DS_Store`) are skipped, as are files
  that are neither images nor caption files, with a count in the log.

Files are written by us, member by member, from the archive's streams, never through
`extractall`, into a temporary folder renamed into place only when complete; a failure leaves
nothing behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator
from zlib import error as zlib_error

from accelerate.utils import broadcast_object_list

from sdft.data.sources import IMAGE_SUFFIXES
from sdft.errors import DataError
from sdft.file_digest import sha256_of

logger = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
# Caption and metadata files travel with the images; everything else is skipped.
CAPTION_SUFFIXES = {".txt", ".csv", ".jsonl", ".json", ".parquet"}
MAX_MEMBERS = 100_000
MAX_TOTAL_BYTES = 20 * 1024**3   # 20 GiB: far above any photo set, far below a bomb's petabytes
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Member:
    name: str          # the path as the archive spells it
    size: int          # uncompressed bytes
    is_dir: bool
    is_link: bool
    open: Callable[[], BinaryIO]


def is_archive(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def archive_digest(path: Path) -> str:
    return sha256_of(path)[:16]


def extraction_folder(archive: Path, cache_root: Path) -> Path:
    name = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return cache_root / "archives" / f"{name}-{archive_digest(archive)}"


def extract_archive(archive: str | os.PathLike, cache_root: str | os.PathLike, *, max_members: int = MAX_MEMBERS,
                    max_total_bytes: int = MAX_TOTAL_BYTES) -> Path:
    """Extract `archive` under `cache_root` (once per content) and return the folder."""
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(f"Archive '{archive}' does not exist.")
    target = extraction_folder(archive, Path(cache_root))
    if target.is_dir():
        logger.info("Reusing %s, extracted earlier from %s", target, archive)
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with _members(archive) as members:
            kept = _plan(archive, members, max_members, max_total_bytes)
            for member, relative in kept:
                try:
                    _write(member, partial / relative, partial)
                except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib_error) as err:
                    raise DataError(f"Archive '{archive}': cannot unpack member '{member.name}': {err}") from err
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(target)
    return target


def _plan(archive: Path, members: list[Member], max_members: int, max_total_bytes: int) -> list[tuple[Member, Path]]:
    """Check every member before writing one; return the files to extract with their safe paths."""
    if len(members) > max_members:
        raise DataError(f"Archive '{archive}' has {len(members)} members, more than the limit of {max_members}.")
    total = sum(m.size for m in members if not m.is_dir)
    if total > max_total_bytes:
        raise DataError(f"Archive '{archive}' would unpack to {total} bytes, more than the limit of "
                        f"{max_total_bytes} (a zip bomb?); member '{max(members, key=lambda m: m.size).name}' alone "
                        f"is {max(m.size for m in members)} bytes.")
    kept, hidden, other = [], 0, 0
    for member in members:
        relative = safe_relative_path(archive, member)
        if member.is_dir:
            continue
        if any(part == "__MACOSX" or part.startswith(".") for part in relative.parts):
            hidden += 1
        elif relative.suffix.lower() in IMAGE_SUFFIXES | CAPTION_SUFFIXES:
            kept.append((member, relative))
        else:
            other += 1
    logger.info("Extracting %d file(s) of %s; skipped %d __MACOSX/hidden file(s) and %d file(s) that are neither "
                "images nor captions", len(kept), archive, hidden, other)
    return kept


def safe_relative_path(archive: Path, member: Member) -> Path:
    if member.is_link:
        raise DataError(f"Archive '{archive}': member '{member.name}' is a symlink or hard link; links are refused "
                        "(they could point outside the extraction folder).")
    name = member.name.replace("\\", "/")
    path = PurePosixPath(name)
    if path.is_absolute() or (len(name) > 1 and name[1] == ":") or ".." in path.parts:
        raise DataError(f"Archive '{archive}': member '{member.name}' would be written outside the extraction "
                        "folder (absolute path or '..'); refusing the archive.")
    return Path(*[p for p in path.parts if p not in ("", ".")]) if path.parts else Path()


def _write(member: Member, destination: Path, root: Path) -> None:
    # Belt and braces: even a path that passed the checks must resolve inside the root.
    if not destination.resolve().is_relative_to(root.resolve()):
        raise DataError(f"Member '{member.name}' resolves outside the extraction folder; refusing it.")
    destination.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with member.open() as source, open(destination, "wb") as sink:
        for chunk in iter(lambda: source.read(_CHUNK), b""):
            written += len(chunk)
            # The header's size can lie; count what actually comes out of the stream.
            if written > member.size:
                raise DataError(f"Member '{member.name}' unpacks to more bytes than its header says "
                                f"({member.size}); refusing the archive.")
            sink.write(chunk)


class _members:
    """Context manager yielding the members of a zip or tar archive in one shape."""

    def __init__(self, archive: Path):
        self.archive = archive
        self.handle = None

    def __enter__(self) -> list[Member]:
        try:
            if self.archive.name.lower().endswith(".zip"):
                self.handle = zipfile.ZipFile(self.archive)
                return list(_zip_members(self.handle))
            self.handle = tarfile.open(self.archive)
            return list(_tar_members(self.handle))
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"Cannot read archive '{self.archive}': {err}") from err

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()


def _zip_members(handle: zipfile.ZipFile) -> Iterator[Member]:
    for info in handle.infolist():
        # Unix mode bits live in the high 16 bits of external_attr; 0o120000 is a symlink.
        is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
        yield Member(info.filename, info.file_size, info.is_dir(), is_link, partial(handle.open, info))


def _tar_members(handle: tarfile.TarFile) -> Iterator[Member]:
    for info in handle.getmembers():
        is_link = info.issym() or info.islnk() or not (info.isfile() or info.isdir())
        yield Member(info.name, info.size, info.isdir(), is_link, partial(handle.extractfile, info))


def data_folder(path: str | None, cache_root: Path, accelerator) -> tuple[str | None, bool]:
    """(folder to read, whether it came from an archive). The main process extracts and tells the
    others the folder, or the error, so a refused archive stops every process, not just one."""
    if path is None or not is_archive(path):
        return path, False
    outcome = [None, None]
    if accelerator.is_main_process:
        try:
            outcome[0] = str(extract_archive(path, cache_root))
        except DataError as err:
            outcome[1] = str(err)
    outcome = broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise DataError(outcome[1])
    return outcome[0], True
