"""`--sample_prompts FILE`: the prompts of each sample set, in kohya sd-scripts' prompt-file syntax.

A `.txt` file holds one prompt a line; options follow the prompt, each introduced by ` --`:

    a photo of sks dog on a beach --n blurry, lowres --w 768 --h 512 --d 42 --l 6.5 --s 30 --ss dpm++ 2m karras

`--n` negative prompt, `--w`/`--h` width and height in pixels, `--d` seed, `--l` guidance (CFG)
scale, `--s` inference steps, `--ss` sampler (sdft.samplers). Empty lines and lines starting with
`#` are skipped. A `.toml` file has a `[prompt]` table of defaults and `[[prompt.subset]]` entries; a
`.json` file is a list of objects; both use the keys `prompt`, `negative_prompt`, `width`, `height`,
`seed`, `scale`, `sample_steps`, `sample_sampler` (kohya's). Unlike kohya, which logs and skips what
it cannot read, an unknown option or a bad value is an error naming the file and line, raised
when the command line is parsed, before any model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import tomllib

from sdft import samplers
from sdft.errors import CliError

MAX_STEPS = 1000


@dataclass(frozen=True)
class SamplePrompt:
    """One image of a sample set; None means the run's default (--resolution, the pipeline's
    guidance, 25 steps, --sample_sampler, --seed + the prompt's position)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    steps: int | None = None
    sampler: str | None = None


# The inline options of a .txt line, and the keys of .toml/.json entries, -> SamplePrompt field.
LINE_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "l": "guidance_scale",
                "s": "steps", "ss": "sampler"}
FILE_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
             "seed": "seed", "scale": "guidance_scale", "sample_steps": "steps", "sample_sampler": "sampler"}
TYPES = {f.name: f.type for f in fields(SamplePrompt)}


def parse_line(line: str) -> dict[str, str]:
    """A .txt line -> {field: raw text}; ValueError for an unknown option."""
    prompt, *options = f" {line}".split(" --")   # the space: a line may start with an option
    values = {"prompt": prompt.strip()}
    for option in options:
        key, _, value = option.strip().partition(" ")
        if key.lower() not in LINE_OPTIONS:
            raise ValueError(f"unknown option --{key} (known: {', '.join('--' + k for k in LINE_OPTIONS)})")
        if not value.strip():
            raise ValueError(f"--{key} needs a value")
        values[LINE_OPTIONS[key.lower()]] = value.strip()
    return values


def typed(values: dict, *, multiple: int, flow: bool) -> SamplePrompt:
    """Raw values -> a checked SamplePrompt; ValueError naming the option."""
    out = {}
    for name, raw in values.items():
        kind = TYPES[name].replace(" | None", "")
        try:
            out[name] = {"int": int, "float": float}.get(kind, str)(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be {'an integer' if kind == 'int' else 'a number'}, got {raw!r}") from None
    prompt = SamplePrompt(**out)
    for side in ("width", "height"):
        size = getattr(prompt, side)
        if size is not None and (size < multiple or size % multiple):
            raise ValueError(f"{side} must be a positive multiple of {multiple} pixels, got {size}")
    if prompt.steps is not None and not 1 <= prompt.steps <= MAX_STEPS:
        raise ValueError(f"steps must be between 1 and {MAX_STEPS}, got {prompt.steps}")
    if prompt.seed is not None and not 0 <= prompt.seed < 2**32:
        raise ValueError(f"seed must be between 0 and 2**32 - 1, got {prompt.seed}")
    if prompt.guidance_scale is not None and prompt.guidance_scale < 0:
        raise ValueError(f"the guidance scale must not be negative, got {prompt.guidance_scale}")
    if prompt.sampler is not None and (package := samplers.missing_package(prompt.sampler, flow)):
        raise ValueError(f"sampler '{prompt.sampler}' needs {package}: pip install {package}")
    if not prompt.prompt:
        raise ValueError("the prompt is empty")
    return prompt


def entries(path: Path) -> list[tuple[str, dict]]:
    """(where, {field: raw value}) per prompt of the file."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        found = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                found.append((f"line {number}", line.strip()))
        return [(where, wrap(where, parse_line, line)) for where, line in found]
    if suffix == ".toml":
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        table = data.get("prompt", {})
        defaults = {k: v for k, v in table.items() if k != "subset"}
        items = [{**defaults, **subset} for subset in table.get("subset", [])]
    elif suffix == ".json":
        items = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(items, list):
            raise ValueError("a .json prompt file holds a list of objects")
    else:
        raise ValueError("the prompt file must end in .txt, .toml or .json")
    return [(f"entry {i + 1}", wrap(f"entry {i + 1}", renamed, item)) for i, item in enumerate(items)]


def renamed(item) -> dict:
    if not isinstance(item, dict):
        raise ValueError(f"expected an object with a 'prompt', got {item!r}")
    unknown = sorted(set(item) - set(FILE_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(FILE_KEYS)})")
    return {FILE_KEYS[key]: value for key, value in item.items()}


def wrap(where: str, parse, value):
    try:
        return parse(value)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def load(path: str | Path, *, multiple: int = 8, flow: bool = False) -> list[SamplePrompt]:
    """The prompts of `path`; CliError naming the file and line (or entry) of the first bad one.
    `multiple`: what sizes must divide into (8, the VAE's factor; SD3 16); `flow`: SD3's samplers."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"--sample_prompts: {path} is not a file.")
    try:
        prompts = [wrap(where, lambda v: typed(v, multiple=multiple, flow=flow), values)
                   for where, values in entries(path)]
    except (ValueError, tomllib.TOMLDecodeError) as err:  # JSONDecodeError is a ValueError
        raise CliError(f"--sample_prompts {path}: {err}") from None
    if not prompts:
        raise CliError(f"--sample_prompts {path} holds no prompt.")
    return prompts
