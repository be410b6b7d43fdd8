"""The sha256 of a big file, remembered so that a second run does not read the file again.

A single-file base is cached by its content hash (sdft.families.base_file), and hashing a 6 GB
SDXL checkpoint reads all 6 GB on every start. An index beside the cache remembers each hash with the
file's resolved path, size and modification time (ns); a file whose size or mtime changed is hashed
again. This is the test make and rsync rely on: a rewrite that keeps both the size and the
nanosecond mtime goes unseen, which no downloader or UI does.

The index is one small JSON file, replaced atomically: two processes writing it at once lose at most
one entry (hashed again next time), and an unreadable index counts as empty.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

logger = logging.getLogger("sdft")

INDEX_NAME = "sha256-index.json"


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    """Reads the whole file (hashlib.file_digest would do, from Python 3.11; we support 3.10)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remembered_sha256(path: Path, index_folder: Path) -> str:
    """The file's sha256, from the index in `index_folder` while the file's size and mtime are the
    ones recorded; otherwise hashed (and recorded when the file did not change while it was read)."""
    resolved = path.resolve()
    before = resolved.stat()
    index_file = index_folder / INDEX_NAME
    entry = read_index(index_file).get(str(resolved))
    if entry is not None and entry.get("size") == before.st_size and entry.get("mtime_ns") == before.st_mtime_ns:
        return entry["sha256"]
    logger.info("Hashing %s (%.1f GB) to key its conversion cache.", resolved, before.st_size / 1e9)
    digest = sha256_of(resolved)
    after = resolved.stat()
    if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
        record(index_file, str(resolved), {"size": before.st_size, "mtime_ns": before.st_mtime_ns, "sha256": digest})
    return digest


def read_index(index_file: Path) -> dict:
    try:
        entries = json.loads(index_file.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def record(index_file: Path, key: str, entry: dict) -> None:
    """Read, update and atomically replace the index (a temporary file renamed over it)."""
    index_file.parent.mkdir(parents=True, exist_ok=True)
    entries = {**read_index(index_file), key: entry}
    staging = index_file.with_name(f".{index_file.name}.{uuid.uuid4().hex}.tmp")
    try:
        staging.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(staging, index_file)
    except OSError as err:   # a read-only cache still works, it hashes every run
        staging.unlink(missing_ok=True)
        logger.warning("Could not record the hash of %s in %s: %s", key, index_file, err)
