"""Before training, every process must have the same model files, the same data and the same
checkpoint to resume. On one machine they read the same paths; across machines (sdft.nodes) each
reads its own disk, and a stale copy on one of them would train replicas that silently diverge
(or, sharded, combine shards of different models). Each process fingerprints what it sees; the
fingerprints are gathered and compared, and a difference stops every process with the names.

A fingerprint hashes every file's relative path and size, and the bytes of small files (configs,
captions, metadata) and of the first and last 64 KiB of large ones: it catches a missing, added,
truncated or replaced file without reading gigabytes of weights on every start.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from accelerate.utils import gather_object

from sdft.errors import UserError

SMALL_FILE = 1 << 20
EDGE = 64 << 10


def fingerprint(*paths: str | Path | None, extra: str = "") -> str:
    """A short digest of the files under `paths` (folders or files; absent ones count as absent)."""
    digest = hashlib.sha256(extra.encode())
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        digest.update(f"|{path.name}".encode())
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            update_with_file(digest, file, path if path.is_dir() else path.parent)
    return digest.hexdigest()[:16]


def model_files(base: Path) -> list[Path]:
    """A diffusers folder's model_index.json and the component folders it names; a single file as it is;
    nothing for a Hub id (its snapshot is fingerprinted by name and revision)."""
    if base.is_file():
        return [base]
    index = base / "model_index.json"
    if not index.is_file():
        return []
    try:
        names = [name for name, value in json.loads(index.read_text()).items() if isinstance(value, list)]
    except ValueError:
        return [index]
    return [index, *(base / name for name in sorted(names) if (base / name).is_dir())]


def update_with_file(digest, file: Path, root: Path) -> None:
    if not file.is_file():
        digest.update(f"{file.relative_to(root)}:absent".encode())
        return
    size = file.stat().st_size
    digest.update(f"{file.relative_to(root)}:{size}".encode())
    with file.open("rb") as handle:
        if size <= SMALL_FILE:
            digest.update(handle.read())
            return
        digest.update(handle.read(EDGE))
        handle.seek(size - EDGE)
        digest.update(handle.read(EDGE))


def disagreements(seen: list[dict[str, str]]) -> list[str]:
    """For each fact on which the processes differ: which process saw what."""
    found = []
    for what in seen[0]:
        values = [facts[what] for facts in seen]
        if len(set(values)) > 1:
            listed = ", ".join(f"process {rank}: {value}" for rank, value in enumerate(values))
            found.append(f"{what} ({listed})")
    return found


def require_agreement(accelerator, facts: dict[str, str]) -> None:
    """Called on every process with the same keys; raises on every process when any value differs."""
    if accelerator.num_processes == 1:
        return
    found = disagreements(gather_object([facts]))
    if found:
        raise UserError("The processes disagree on " + "; ".join(found) + ". Every machine needs the same files: "
                        "copy them, or use one folder all machines see.")
