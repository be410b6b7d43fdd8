"""Builders for the subject-from-a-zip tests: a zip laid out as users make them (nested folders,
macOS's __MACOSX and .DS_Store, PNG and JPEG of mixed sizes, a caption.csv), and hostile archives."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

from PIL import Image

from sdft.tiny import make_images

# (member name, size); sizes below and above the tests' resolution of 32 on the shorter side.
PHOTOS = (("photos/one.png", (48, 64)), ("photos/trip/two.jpg", (20, 28)), ("three.jpg", (64, 40)),
          ("photos/trip/deep/four.png", (24, 24)))


def photo_zip(path: Path, captions: dict[str, str] | None = None, csv_name: str = "caption.csv") -> Path:
    """A zip of PHOTOS with __MACOSX entries, a .DS_Store, a non-image, and (unless `captions` is
    empty) a caption CSV at the root naming each photo by its file name."""
    source = make_images(path.parent / (path.stem + "-src"), num_images=len(PHOTOS), layout="images")
    pictures = sorted(p for p in source.iterdir())
    if captions is None:
        captions = {Path(name).name: f"a photo of sks {i}" for i, (name, _) in enumerate(PHOTOS)}
    with zipfile.ZipFile(path, "w") as archive:
        for (name, size), picture in zip(PHOTOS, pictures):
            image = Image.open(picture).convert("RGB").resize(size)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG" if name.endswith(".png") else "JPEG")
            archive.writestr(name, buffer.getvalue())
            archive.writestr(f"__MACOSX/{Path(name).parent}/._{Path(name).name}", b"\x00\x05\x16\x07resource fork")
        archive.writestr("photos/.DS_Store", b"\x00\x00\x00\x01Bud1")
        archive.writestr("notes.docx", b"PK not an image")
        if captions:
            lines = io.StringIO()
            writer = csv.writer(lines)
            writer.writerow(["image_file", "caption"])
            writer.writerows(captions.items())
            archive.writestr(csv_name, lines.getvalue())
    return path
