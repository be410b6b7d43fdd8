"""scripts/check_demo.py on pictures drawn to pass and to fail: what the demo's user reads at the end."""

import importlib.util
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from sdft.tiny import COLOURS

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_demo.py"
PROMPTS = ("a red circle on a blue background", "a green square on a yellow background")


@pytest.fixture(scope="module")
def check_demo():
    spec = importlib.util.spec_from_file_location("check_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up while the script runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def picture(shape: str, background: str) -> Image.Image:
    """A 32 px demo-like picture: a `shape`-coloured block in the middle of a `background` field."""
    image = Image.new("RGB", (32, 32), COLOURS[background])
    ImageDraw.Draw(image).rectangle((9, 9, 22, 22), fill=COLOURS[shape])
    return image


def write_round(folder: Path, images: list[Image.Image], prompts=PROMPTS) -> None:
    folder.mkdir(parents=True)
    for index, image in enumerate(images):
        image.save(folder / f"{index:02d}.png")
    (folder / "prompts.txt").write_text("".join(f"{i:02d}.png\t{p}\n" for i, p in enumerate(prompts)))


def demo_output(root: Path, final: list[Image.Image], first: list[Image.Image] | None = None,
                sample: Image.Image | None = None) -> Path:
    """The folders check_demo reads, as the demo writes them."""
    validation = root / "model" / "validation"
    untrained = [picture("yellow", "yellow")] * len(PROMPTS)   # a flat field shows no prompt
    write_round(validation / "epoch-0000", first or untrained)
    write_round(validation / "epoch-0010", untrained)          # a later round is not the first
    write_round(validation / "final", final)
    (sample or picture("red", "blue")).save(root / "sample.png")
    return root


def right_pictures() -> list[Image.Image]:
    return [picture("red", "blue"), picture("green", "yellow")]


def test_all_prompts_shown_and_not_before_training_passes(check_demo, tmp_path: Path, capsys) -> None:
    out = demo_output(tmp_path, final=right_pictures())
    assert check_demo.main([str(out), "red,blue,green,yellow"]) == 0
    printed = capsys.readouterr().out
    assert "Demo check passed" in printed
    assert f"shows '{PROMPTS[1]}'" in printed


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_a_final_image_that_misses_its_prompt_is_named_with_its_colours(check_demo, tmp_path: Path, capsys,
                                                                        index: int) -> None:
    final = right_pictures()
    final[index] = picture("red", "yellow")  # what the old demo drew for the second prompt, roughly
    out = demo_output(tmp_path, final=final)
    assert check_demo.main([str(out)]) == 1
    failed = capsys.readouterr().out.split("Demo check FAILED:")[1]
    other = PROMPTS[1 - index]
    assert f"does not show '{PROMPTS[index]}'" in failed and other not in failed
    # The measured colours, in RGB and as the nearest demo colour, next to the ones asked for.
    shape, background = check_demo.prompt_colours(PROMPTS[index])
    assert f"centre {list(COLOURS['red'])} ~ red (wants {shape})" in failed
    assert f"border {list(COLOURS['yellow'])} ~ yellow (wants {background})" in failed


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_a_first_round_image_that_already_shows_its_prompt_fails_the_check(check_demo, tmp_path: Path, capsys,
                                                                           index: int) -> None:
    first = [picture("yellow", "yellow")] * len(PROMPTS)
    first[index] = right_pictures()[index]
    out = demo_output(tmp_path, final=right_pictures(), first=first)
    assert check_demo.main([str(out)]) == 1
    failed = capsys.readouterr().out.split("Demo check FAILED:")[1]
    assert f"already shows, before training, '{PROMPTS[index]}'" in failed
    assert "epoch-0000" in failed and PROMPTS[1 - index] not in failed


def test_sample_png_is_checked_against_its_own_prompt(check_demo, tmp_path: Path, capsys) -> None:
    out = demo_output(tmp_path, final=right_pictures(), sample=picture("blue", "red"))
    assert check_demo.main([str(out)]) == 1
    failed = capsys.readouterr().out.split("Demo check FAILED:")[1]
    assert f"does not show '{check_demo.SAMPLE_PROMPT}' ({out / 'sample.png'})" in failed
    assert f"centre {list(COLOURS['blue'])} ~ blue (wants red)" in failed


def test_washed_out_colours_count_as_the_nearest_demo_colour(check_demo) -> None:
    # A small model's blue background comes out greyish; among the demo's colours it is still blue.
    greyish_blue = Image.new("RGB", (32, 32), (95, 105, 160))
    ImageDraw.Draw(greyish_blue).rectangle((9, 9, 22, 22), fill=(190, 70, 60))
    verdict = check_demo.judge(greyish_blue, PROMPTS[0], check_demo.DEMO_COLOURS, Path("x.png"))
    assert (verdict.centre, verdict.border, verdict.shows_prompt) == ("red", "blue", True)


@pytest.mark.parametrize("label", ["", "[EMA] ", "[raw] "])
def test_ema_and_raw_row_labels_are_read_as_their_prompt(check_demo, label: str) -> None:
    """With --use_ema a round's prompts.txt says "[EMA] a green square ..." and "[raw] ..."."""
    assert check_demo.prompt_colours(f"{label}a green square on a yellow background") == ("green", "yellow")
