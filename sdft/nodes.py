"""Several machines (`accelerate launch --num_machines N --machine_rank R --main_process_ip ...`):
whether they share the output folder, and which processes do the work written there.

With a shared folder (a network file system), disk caches and checkpoints are written once, split
over all processes. When every machine has its own disk, each machine must end up with its own
complete copy: the cache entries are split over that machine's processes, and its first process
(local rank 0) finalizes its checkpoints, so `--resume_from_checkpoint latest` finds them there.
Which case holds is found out, not configured: the main process writes a marker file and every
process looks for it.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import broadcast_object_list, gather_object

from sdft.errors import CliError

logger = logging.getLogger("sdft")
VISIBLE_WITHIN_S = 5.0


@dataclass(frozen=True)
class Layout:
    shared: bool        # every process sees the same output folder
    index: int          # this process's place among the processes that see its folder
    count: int          # how many processes see its folder
    writer: bool        # the one process that finalizes what is written once per folder

    @classmethod
    def single(cls) -> "Layout":
        return cls(shared=True, index=0, count=1, writer=True)


def output_layout(accelerator, output_dir: Path) -> Layout:
    """Called on every process, before anything is written to `output_dir`."""
    if accelerator.num_processes == 1:
        return Layout.single()
    output_dir.mkdir(parents=True, exist_ok=True)
    token = broadcast_object_list([uuid.uuid4().hex if accelerator.is_main_process else None])[0]
    marker = output_dir / f".sdft-shared-{token}"
    if accelerator.is_main_process:
        marker.write_text(token)
    accelerator.wait_for_everyone()
    shared = all(gather_object([appears(marker, VISIBLE_WITHIN_S)]))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink()
    if shared:
        layout = Layout(True, accelerator.process_index, accelerator.num_processes, accelerator.is_main_process)
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        layout = Layout(False, accelerator.local_process_index, local, accelerator.is_local_main_process)
    describe(layout, accelerator.num_processes, output_dir)
    return layout


def appears(path: Path, seconds: float) -> bool:
    """Whether `path` exists now or within `seconds`: a network file system may show another
    machine's new file only after its attribute cache expires (NFS: a few seconds)."""
    deadline = time.monotonic() + seconds
    while not path.is_file():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def refuse_unshared(output_dir: Path, uses: dict[str, bool]) -> None:
    """What writes to the output folder once for all machines cannot run when each machine has its
    own: a clear error naming it, on every process alike (the layout is the same on all)."""
    found = [what for what, used in uses.items() if used]
    if found:
        raise CliError(f"--output_dir {output_dir} is not shared between the machines, which {'; '.join(found)} "
                       "needs: give every machine the same folder (a network file system).")


def describe(layout: Layout, num_processes: int, output_dir: Path) -> None:
    if layout.shared:
        logger.info("%s is shared by all %d processes: caches and checkpoints are written once.", output_dir,
                    num_processes)
    elif layout.writer:
        logger.warning("%s is not shared between the machines: each machine fills its own caches and keeps its "
                       "own checkpoints (split over its %d processes).", output_dir, layout.count)
