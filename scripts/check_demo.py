"""Check that the demo's pictures show what its prompt asks for, and that the untrained ones do not.

    python scripts/check_demo.py demo-output [red,blue,green,yellow]

For "a red circle on a blue background", the mean colour of the image's border (its outer eighth
on each side) must be nearest to blue and the mean colour of its centre (the middle quarter of
each side) nearest to red, among the colours the demo's images are drawn in (the second
argument; the same list as `sdft.tiny data --colours`). A small model's colours come out a little
washed out (its blue background is greyish), which is why the comparison is against the colours
it was trained on rather than against every colour the tiny set knows. The check must pass
for sample.png (generated from the saved pipeline) and fail for the first validation image,
generated after one epoch: together they say that the training, not the setup, made the picture.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdft.tiny import COLOURS  # noqa: E402

PROMPT = "a red circle on a blue background"


def prompt_colours(prompt: str) -> tuple[str, str]:
    """(shape colour, background colour) of a tiny-set caption such as PROMPT."""
    words = prompt.split()
    return words[1], words[words.index("on") + 2]


DEMO_COLOURS = ("red", "blue", "green", "yellow")


def nearest_colour(rgb: np.ndarray, palette: tuple[str, ...]) -> str:
    return min(palette, key=lambda name: float(np.linalg.norm(rgb - np.array(COLOURS[name]))))


def region_colours(path: Path, palette: tuple[str, ...]) -> tuple[str, str, np.ndarray, np.ndarray]:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    height, width = pixels.shape[:2]
    by, bx = max(1, height // 8), max(1, width // 8)
    mask = np.ones((height, width), dtype=bool)
    mask[by:height - by, bx:width - bx] = False
    border = pixels[mask].mean(axis=0)
    centre = pixels[3 * height // 8:5 * height // 8, 3 * width // 8:5 * width // 8].reshape(-1, 3).mean(axis=0)
    return nearest_colour(centre, palette), nearest_colour(border, palette), centre, border


def shows_prompt(path: Path, prompt: str = PROMPT, palette: tuple[str, ...] = DEMO_COLOURS) -> bool:
    shape, background = prompt_colours(prompt)
    centre, border, centre_rgb, border_rgb = region_colours(path, palette)
    verdict = centre == shape and border == background
    print(f"{path}: centre {centre_rgb.round().astype(int).tolist()} ~ {centre}, "
          f"border {border_rgb.round().astype(int).tolist()} ~ {border}: "
          f"{'shows' if verdict else 'does not show'} '{prompt}'")
    return verdict


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "demo-output")
    palette = tuple(argv[1].split(",")) if len(argv) > 1 else DEMO_COLOURS
    trained = shows_prompt(out / "sample.png", palette=palette)
    untrained = shows_prompt(out / "model" / "validation" / "epoch-0000" / "00.png", palette=palette)
    if trained and not untrained:
        print("Demo check passed: the trained model draws the prompt, the one after one epoch did not.")
        return 0
    print("Demo check FAILED: " + ("sample.png does not show the prompt." if not trained else
                                   "the epoch-0 image already shows the prompt, so it proves nothing."))
    return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
