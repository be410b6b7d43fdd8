"""Where cache entries live (one safetensors file each, or a dict in RAM) and how a cache is filled.

An entry is named by the SHA-256 of a JSON description of everything it depends on, so an entry
that exists is an entry that matches: changing an image, the model or the transform changes the
name, and the old entry is simply not read. Files are written to a temporary name and renamed,
so a killed fill leaves whole entries and at most a stray temporary file; the next fill skips the
whole ones and continues where it stopped.

With several processes, each encodes its share of the entries and then polls the folder for the
others' entries, so no process sits in a collective for the length of the fill (kohya sd-scripts
#971: a single barrier after a long cache fill hits the DDP/NCCL timeout).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sdft.errors import DataError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1   # bump when the content of an entry changes meaning
POLL_SECONDS = 0.5
WAIT_LOG_SECONDS = 60.0


def entry_name(description: dict) -> str:
    """A stable name for what `description` (JSON-serialisable) describes."""
    text = json.dumps({"format": FORMAT_VERSION, **description}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def prepare_folder(folder: Path, flag: str) -> Path:
    """Create `folder` and prove it can be written, or fail naming it (before any model loads)."""
    probe = folder / f".write-test-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DataError(f"The cache folder {folder} ({flag}) cannot be written: {err}") from err
    return folder


class DiskStore:
    """Entries as `<folder>/<name[:2]>/<name>.safetensors`; reads are lazy, one entry at a time."""

    shared = True   # every process sees the same entries, so the work can be split

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        return self.folder / name[:2] / f"{name}.safetensors"

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def readable(self, name: str, label: str) -> bool:
        """False if missing; a present entry that cannot be read is removed with a warning."""
        path = self.path(name)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
            return True
        except (SafetensorError, OSError, ValueError) as err:
            logger.warning("The cache entry %s of %s cannot be read (%s); encoding it again.", path, label, err)
            path.unlink(missing_ok=True)
            return False

    def write(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(temporary))
        os.replace(temporary, path)   # atomic on POSIX: readers see the old state or the whole entry

    def read(self, name: str, label: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(self.path(name)))
        except (SafetensorError, OSError) as err:
            raise DataError(f"The cache entry {self.path(name)} of {label} cannot be read ({err}); "
                            "run again to encode it anew.") from err


class MemoryStore:
    """Entries in this process's RAM (--cache_latents / --cache_text_encoder_outputs without
    _to_disk): they grow with the dataset, and every process encodes all of them."""

    shared = False

    def __init__(self):
        self.entries: dict[str, dict[str, torch.Tensor]] = {}

    def readable(self, name: str, label: str) -> bool:
        return name in self.entries

    def exists(self, name: str) -> bool:
        return name in self.entries

    def write(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.entries[name] = tensors

    def read(self, name: str, label: str) -> dict[str, torch.Tensor]:
        return self.entries[name]


@dataclass(frozen=True)
class Job:
    name: str        # the entry's name
    label: str       # what a warning names: the image or the caption
    source: object   # what `encode` turns into the entry (an image key, a caption)


@dataclass(frozen=True)
class FillResult:
    encoded: int
    reused: int


def fill(store, jobs: Sequence[Job], encode: Callable[[list[Job]], list[dict]], *, process_index: int,
         num_processes: int, desc: str, show_progress: bool, batch_size: int = 1) -> FillResult:
    """Encode the entries of `jobs` that `store` lacks. A shared store splits the jobs between the
    processes (job i to process i % n) and returns once every process's entries exist."""
    if not store.shared:
        process_index, num_processes = 0, 1
    mine = list(jobs[process_index::num_processes])
    todo = [job for job in mine if not store.readable(job.name, job.label)]
    progress = tqdm(total=len(todo), desc=desc, unit="entry", disable=not show_progress or not todo)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        for job, tensors in zip(chunk, encode(chunk)):
            store.write(job.name, tensors)
        progress.update(len(chunk))
    progress.close()
    if num_processes > 1:
        others = [job for index, job in enumerate(jobs) if index % num_processes != process_index]
        wait_for_entries(store, others)
    return FillResult(encoded=len(todo), reused=len(mine) - len(todo))


def wait_for_entries(store: DiskStore, jobs: Sequence[Job]) -> None:
    """Poll (no collective) until the other processes' entries exist."""
    pending = [job for job in jobs if not store.exists(job.name)]
    last_log = time.monotonic()
    while pending:
        time.sleep(POLL_SECONDS)
        pending = [job for job in pending if not store.exists(job.name)]
        if pending and time.monotonic() - last_log > WAIT_LOG_SECONDS:
            logger.info("Waiting for %d cache entries from the other processes", len(pending))
            last_log = time.monotonic()
