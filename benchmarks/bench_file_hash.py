"""How long the conversion cache's key costs: sha256 of a multi-GB single-file base on the first run,
and the remembered hash (sdft.file_digest) on the next.

    flock /tmp/sdft-heavy.lock .venv/bin/python benchmarks/bench_file_hash.py --gb 3

Writes a file of zeros of that size under /tmp (sha256 reads zeros as fast as any bytes), times the
first hash and the second lookup, and deletes the file. The file was just written, so the first hash
reads it from the page cache when RAM allows: the number is the hashing rate, a lower bound on a
cold read from disk. Results go to file_hash.md by hand, with `uptime`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from sdft.file_digest import remembered_sha256


def write_zeros(path: Path, gigabytes: float, block: int = 1 << 26) -> int:
    size = int(gigabytes * (1 << 30))
    zeros = bytes(block)
    with open(path, "wb") as handle:
        for start in range(0, size, block):
            handle.write(zeros[: min(block, size - start)])
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.0, help="file size in GiB (default 3)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="sdft-hash-") as folder:
        path, index = Path(folder) / "base.safetensors", Path(folder) / "cache"
        size = write_zeros(path, options.gb)
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            digest = remembered_sha256(path, index)
            timings.append(time.perf_counter() - started)
        os.remove(path)
    print(f"file {size / (1 << 30):.2f} GiB, sha256 {digest[:16]}")
    print(f"first run (hash):       {timings[0]:.2f} s  ({size / (1 << 20) / timings[0]:.0f} MiB/s)")
    print(f"second run (from index): {timings[1] * 1000:.2f} ms")
    print("load:", os.getloadavg())


if __name__ == "__main__":
    main()
