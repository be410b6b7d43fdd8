"""loss.png and validation/grid.png from sdft.plots, and the run summary from sdft.run_stats."""

from __future__ import annotations

import json
import logging
import sys
from array import array

import pytest
import torch
from PIL import Image

from sdft import plots
from sdft.run_stats import RunStats, step_rss_text


def write_round(validation_dir, folder, colours):
    out = validation_dir / folder
    out.mkdir(parents=True)
    for index, colour in enumerate(colours):
        Image.new("RGB", (32, 32), colour).save(out / f"{index:02d}.png")
    (out / "prompts.txt").write_text("00.png\ta red circle\n01.png\ta blue square on a very long background name\n")


def test_pictures_record_logged_losses_and_draw_grid_by_step(tmp_path):
    pictures = plots.Pictures(tmp_path)
    for step in range(1, 31):
        pictures.log({"train_loss": 1.0 / step, "lr": 1e-3}, step=step)
    pictures.log({"val_loss": 0.5}, step=10)
    pictures.log({"val_loss": 0.2}, step=30)
    write_round(tmp_path / "validation", "epoch-0000", ["black", "black"])
    pictures.redraw("epoch-0000", 10)
    write_round(tmp_path / "validation", "final", ["red", "blue"])
    drawn = pictures.redraw("final", 30)

    assert pictures.val_loss == [(10, 0.5), (30, 0.2)]
    assert drawn == [tmp_path / "loss.png", tmp_path / "validation" / "grid.png"]
    assert Image.open(tmp_path / "loss.png").size == plots.LOSS_SIZE_PX
    grid = Image.open(tmp_path / "validation" / "grid.png").convert("RGB")
    assert grid.size == plots.grid_size_px(rows=2, columns=2)
    assert json.loads((tmp_path / "validation" / "rounds.json").read_text()) == {"epoch-0000": 10, "final": 30}
    # The last column (final) holds the red image in row 0, the blue one in row 1.
    cell, (left, top) = plots.GRID_CELL_PX, plots.GRID_LABEL_PX
    assert grid.getpixel((left + cell + cell // 2, top + cell // 2)) == (255, 0, 0)
    assert grid.getpixel((left + cell + cell // 2, top + cell + cell // 2)) == (0, 0, 255)
    assert grid.getpixel((left + cell // 2, top + cell // 2)) == (0, 0, 0)


def test_long_runs_show_first_and_last_rounds():
    rounds = list(range(40))
    shown = plots.shown_rounds(rounds)
    assert len(shown) == plots.GRID_MAX_ROUNDS and shown[0] == 0 and shown[-1] == 39


def test_without_matplotlib_no_pictures_and_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    monkeypatch.setattr(plots, "_warned", False)
    pictures = plots.Pictures(tmp_path)
    pictures.log({"train_loss": 1.0}, step=1)
    with caplog.at_level(logging.WARNING, logger="sdft.plots"):
        assert pictures.redraw() == []
        assert pictures.redraw() == []
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "matplotlib" in caplog.records[0].message
    assert not (tmp_path / "loss.png").exists()


def test_run_stats_summary_excludes_first_step():
    stats = RunStats(enabled=True, device=torch.device("cpu"), num_processes=2)
    batches = [{"captions": ["a", "b"], "pixel_values": torch.zeros(2, 3, 4, 4)}] * 3
    for _ in stats.batches(batches):
        for phase in ("vae", "text", "denoiser", "optimizer"):
            stats.lap(phase)
        stats.end_step()
    stats.step_s = [5.0, 0.5, 0.5]  # a slow first step must not count in the steady rate
    summary = stats.summary()
    assert summary["steps"] == "3" and summary["images seen"] == "12"
    assert summary["steady steps/s"] == "2.00" and summary["steady images/s"] == "8.0"
    assert "peak RSS" in summary["peak memory"]
    assert summary["step time"].startswith("data loading ")
    assert float(summary["time to first step"].split()[0]) >= 0


def test_disabled_stats_record_nothing():
    stats = RunStats.off()
    assert list(stats.batches([{"captions": ["a"]}])) == [{"captions": ["a"]}]
    stats.lap("vae")
    stats.end_step()
    assert stats.step_s == [] and stats.log_summary() == {}


@pytest.mark.parametrize("phase", ["vae", "text", "denoiser", "optimizer"])
def test_lap_charges_the_named_phase(phase):
    stats = RunStats(enabled=True, device=torch.device("cpu"))
    for _ in stats.batches([{"captions": ["a"]}]):
        stats._lap_start -= 1.0  # as if the phase took a second
        stats.lap(phase)
    assert stats.phase_s[phase] >= 1.0


def test_run_stats_keeps_each_steps_phases():
    """benchmarks/bench_train.py reads these to leave out warm-up steps and to break the first step down."""
    stats = RunStats(enabled=True, device=torch.device("cpu"))
    for step, _ in enumerate(stats.batches([{"captions": ["a"]}] * 2)):
        stats._lap_start -= 1.0 + step  # as if the denoiser took 1 s, then 2 s
        stats.lap("denoiser")
        stats.lap("optimizer")
        stats.end_step()
    assert list(stats.step_phase_s["denoiser"]) == pytest.approx([1.0, 2.0], abs=0.05)
    assert all(len(seconds) == 2 for seconds in stats.step_phase_s.values())
    assert stats.phase_s["denoiser"] == pytest.approx(sum(stats.step_phase_s["denoiser"]))
    assert stats.first_step_at <= stats.last_step_at


def test_run_summary_shows_the_resident_memory_at_each_step_end():
    """Issue 26: memory that climbs from step to step shows in the summary, not only the peak."""
    stats = RunStats(enabled=True, device=torch.device("cpu"))
    held = []
    for _ in stats.batches([{"captions": ["a"]}] * 3):
        held.append(torch.ones(64 * 2**20, dtype=torch.uint8))  # 64 MiB more resident each step
        stats.lap("denoiser")
        stats.end_step()
    assert len(stats.step_rss) == 3
    assert stats.step_rss[2] - stats.step_rss[0] >= 2 * 60 * 2**20
    line = stats.summary()["resident at step ends"]
    assert line.endswith("GiB (steps 1-3)") and line.count(",") == 2
    long_run = step_rss_text(array("d", [2**30 * (1 + i / 100) for i in range(20)]))
    assert long_run.startswith("1.00, 1.01, 1.02, 1.03 ... 1.16, 1.17, 1.18, 1.19 GiB (steps 1-20; max 1.19 at step 20)")


def test_grid_keeps_the_raw_rows_of_in_run_sets_beside_an_ema_only_final_set(tmp_path):
    """With EMA, in-run sets have [EMA] and [raw] rows; the final set (the saved EMA model) has one
    row per prompt. The grid keeps the in-run order and labels, the final column fills the EMA rows."""
    validation = tmp_path / "validation"
    step = validation / "step-000002"
    step.mkdir(parents=True)
    rows = [("00.png", "[EMA] a cat", "red"), ("00-raw.png", "[raw] a cat", "green"),
            ("01.png", "[EMA] a dog", "blue"), ("01-raw.png", "[raw] a dog", "white")]
    for name, _, colour in rows:
        Image.new("RGB", (32, 32), colour).save(step / name)
    (step / "prompts.txt").write_text("".join(f"{name}\t{label}\n" for name, label, _ in rows))
    write_round(validation, "final", ["red", "blue"])
    assert plots.grid_rows(validation, ["step-000002", "final"]) == [[name, label] for name, label, _ in rows]
    pictures = plots.Pictures(tmp_path)
    pictures.redraw("step-000002", 2)
    pictures.redraw("final", 4)
    grid = Image.open(validation / "grid.png").convert("RGB")
    assert grid.size == plots.grid_size_px(rows=4, columns=2)
    cell, (left, top) = plots.GRID_CELL_PX, plots.GRID_LABEL_PX
    final_column = [grid.getpixel((left + cell + cell // 2, top + row * cell + cell // 2)) for row in range(4)]
    assert final_column[0] == (255, 0, 0) and final_column[2] == (0, 0, 255)   # the EMA rows
    assert final_column[1] == final_column[3] == (255, 255, 255)               # no raw image: blank
