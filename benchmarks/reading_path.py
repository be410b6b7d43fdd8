"""How much of the repository a plain SDXL full fine-tune runs: the files and the lines of the
functions it calls (tiny model, 2 steps, in this process), i.e. what a newcomer reads to follow it.

    .venv/bin/python benchmarks/reading_path.py [REPO]     # REPO: another checkout to measure
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]).resolve()
sys.path.insert(0, str(REPO))
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def record(seen: dict, frame) -> None:
    code = frame.f_code
    if code.co_filename.startswith(str(REPO)) and "/.venv/" not in code.co_filename \
            and "tiny" not in Path(code.co_filename).name:
        last = max([line for _, _, line in code.co_lines() if line] + [code.co_firstlineno])
        seen.setdefault(code.co_filename, set()).update(range(code.co_firstlineno, last + 1))


def main() -> None:
    os.chdir(REPO)
    from sdft.tiny import build_sdxl, make_images

    tmp = Path(tempfile.mkdtemp())
    model, data = build_sdxl(tmp / "model"), make_images(tmp / "data", num_images=4, layout="metadata")
    script = importlib.import_module("train_text_to_image_sdxl")
    run = getattr(importlib.import_module("sdft.cli"), "run", None) or importlib.import_module("sdft.trainer").run
    argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir",
            str(tmp / "out"), "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2",
            "--report_to", "none", "--seed", "0"]
    seen: dict[str, set[int]] = {}
    sys.setprofile(lambda frame, event, arg: record(seen, frame) if event == "call" else None)
    status = run(script.main, script.parse_args(argv))
    sys.setprofile(None)
    for name, lines in sorted(seen.items(), key=lambda item: -len(item[1])):
        print(f"{len(lines):5d}  {os.path.relpath(name, REPO)}")
    print(f"exit {status}: {len(seen)} files, {sum(map(len, seen.values()))} lines of called functions")


if __name__ == "__main__":
    main()
