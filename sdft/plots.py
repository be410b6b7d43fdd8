"""The pictures in every output folder: `loss.png` and `validation/grid.png`.

`Pictures` is an accelerate tracker (`GeneralTracker`), so it sees every scalar the run logs
through `accelerator.log` (the training loss each step, `val_loss` whenever validation loss is
logged) without the loop calling it. `redraw` records a validation round and draws both files
again; the trainer calls it after each validation and at the end, on the main process only.

matplotlib is optional at import time: without it there are no pictures and one warning.
Rounds are listed in `validation/rounds.json` (folder -> step), so a resumed run's grid keeps the
rounds of the run before it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from accelerate.tracking import GeneralTracker
from PIL import Image

logger = logging.getLogger(__name__)

GRID_CELL_PX = 128        # each validation image is drawn in a square this wide
GRID_LABEL_PX = (200, 24)  # room for the prompt (left) and the step (top)
GRID_MAX_ROUNDS = 12       # columns; longer runs show evenly spaced rounds, first and last included
GRID_MAX_ROWS = 8
LOSS_SIZE_PX = (800, 450)
DPI = 100

_warned = False


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or None (with one warning) if missing."""
    global _warned
    try:
        import matplotlib
    except ImportError:
        if not _warned:
            logger.warning("matplotlib is not installed: no loss.png or validation/grid.png "
                           "(pip install matplotlib to get them).")
            _warned = True
        return None
    matplotlib.use("Agg")  # no display, and safe in any thread or process
    import matplotlib.pyplot as plt

    return plt


class Pictures(GeneralTracker):
    """Records logged scalars; draws loss.png and validation/grid.png into `output_dir`."""

    name = "sdft-pictures"
    requires_logging_directory = False
    takes_images = False  # validation.log_images skips it

    def __init__(self, output_dir: Path):
        super().__init__()
        self.output_dir = Path(output_dir)
        self.train_loss: list[tuple[int, float]] = []
        self.val_loss: list[tuple[int, float]] = []

    @classmethod
    def attach(cls, accelerator, output_dir: Path) -> "Pictures":
        """Add to the accelerator's trackers (call after init_trackers, on the main process)."""
        pictures = cls(output_dir)
        accelerator.trackers.append(pictures)
        return pictures

    @property
    def tracker(self):
        return self

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        if step is None:
            return
        if isinstance(values.get("train_loss"), (int, float)):
            self.train_loss.append((step, float(values["train_loss"])))
        if isinstance(values.get("val_loss"), (int, float)):
            self.val_loss.append((step, float(values["val_loss"])))

    def redraw(self, folder: str | None = None, step: int | None = None) -> list[Path]:
        """Record validation round `folder` (under validation/) at `step`, then draw both pictures."""
        validation_dir = self.output_dir / "validation"
        rounds_file = validation_dir / "rounds.json"
        rounds = json.loads(rounds_file.read_text()) if rounds_file.is_file() else {}
        if folder is not None:
            rounds[folder] = step
            rounds_file.parent.mkdir(parents=True, exist_ok=True)
            rounds_file.write_text(json.dumps(rounds, indent=1, sort_keys=True) + "\n")
        plt = pyplot()
        if plt is None:
            return []
        drawn = []
        if self.train_loss or self.val_loss:
            drawn.append(draw_loss(plt, self.output_dir / "loss.png", self.train_loss, self.val_loss))
        if rounds:
            drawn.append(draw_grid(plt, validation_dir / "grid.png", validation_dir, rounds))
        return drawn


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what there is so far)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def draw_loss(plt, path: Path, train: list[tuple[int, float]], val: list[tuple[int, float]]) -> Path:
    figure = plt.figure(figsize=(LOSS_SIZE_PX[0] / DPI, LOSS_SIZE_PX[1] / DPI), dpi=DPI)
    axes = figure.add_axes((0.09, 0.12, 0.88, 0.8))
    if train:
        steps, losses = zip(*train)
        window = max(1, len(losses) // 25)
        axes.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss")
        axes.plot(steps, smoothed(list(losses), window), color="tab:blue", linewidth=1.8,
                  label=f"train loss, mean of {window} steps")
    if val:
        axes.plot(*zip(*val), "o-", color="tab:orange", label="validation loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def grid_size_px(rows: int, columns: int) -> tuple[int, int]:
    rows, columns = min(rows, GRID_MAX_ROWS), min(columns, GRID_MAX_ROUNDS)
    return GRID_LABEL_PX[0] + columns * GRID_CELL_PX, GRID_LABEL_PX[1] + rows * GRID_CELL_PX


def shown_rounds(rounds: list, limit: int = GRID_MAX_ROUNDS) -> list:
    if len(rounds) <= limit:
        return rounds
    picks = sorted({round(i * (len(rounds) - 1) / (limit - 1)) for i in range(limit)})
    return [rounds[i] for i in picks]


def round_order(item: tuple[str, int | None]) -> tuple:
    folder, step = item
    return (folder == "final", step if step is not None else math.inf, folder)


def draw_grid(plt, path: Path, validation_dir: Path, rounds: dict[str, int | None]) -> Path:
    """Rows are the images of a set (prompts.txt: the newest round's, then rows only earlier rounds
    have, such as the raw-weights rows of in-run sets beside an EMA-only final set), columns the rounds."""
    ordered = shown_rounds(sorted(rounds.items(), key=round_order))
    entries = grid_rows(validation_dir, [folder for folder, _ in ordered])[:GRID_MAX_ROWS]
    width, height = grid_size_px(len(entries), len(ordered))
    figure = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    for column, (folder, step) in enumerate(ordered):
        for row, (name, prompt) in enumerate(entries):
            left = (GRID_LABEL_PX[0] + column * GRID_CELL_PX + 2) / width
            bottom = 1 - (GRID_LABEL_PX[1] + (row + 1) * GRID_CELL_PX - 2) / height
            axes = figure.add_axes((left, bottom, (GRID_CELL_PX - 4) / width, (GRID_CELL_PX - 4) / height))
            axes.set_axis_off()
            image = validation_dir / folder / name
            if image.is_file():
                with Image.open(image) as opened:
                    axes.imshow(opened.convert("RGB"), interpolation="nearest")
            if row == 0:
                label = f"step {step}" if step is not None else folder
                axes.set_title(label if folder != "final" else f"final ({label})", fontsize=9)
            if column == 0:
                figure.text(4 / width, bottom + (GRID_CELL_PX / 2) / height, _wrap(prompt), fontsize=8,
                            va="center", ha="left")
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def grid_rows(validation_dir: Path, folders: list[str]) -> list[list[str]]:
    """(file name, label) rows of the rounds in `folders` (oldest first): the round with the most
    rows sets the order and labels (the newest among equals), other rows follow, each file once."""
    tables = []
    for age, folder in enumerate(folders):
        prompt_file = validation_dir / folder / "prompts.txt"
        if prompt_file.is_file():
            lines = [line.split("\t", 1) for line in prompt_file.read_text().splitlines() if line]
            tables.append((len(lines), age, lines))
    rows: dict[str, str] = {}
    for _, _, lines in sorted(tables, reverse=True):
        for name, label in lines:
            rows.setdefault(name, label)
    return [[name, label] for name, label in rows.items()]


def _wrap(text: str, width: int = 28, lines: int = 4) -> str:
    words, out = text.split(), [""]
    for word in words:
        if out[-1] and len(out[-1]) + 1 + len(word) > width:
            out.append("")
        out[-1] = f"{out[-1]} {word}".strip()
    return "\n".join(out[:lines]) + ("..." if len(out) > lines else "")
