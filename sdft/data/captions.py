"""Caption augmentation with kohya sd-scripts' options and meaning, as one pure function.

`augment_caption(caption, settings, epoch, rng)` returns the caption the text encoder sees. The
steps, in kohya's order (sd-scripts docs/config_README-en.md):

1. whole-caption dropout: the empty caption in every epoch `e` with (e + 1) % every_n == 0
   (`caption_dropout_every_n_epochs`, kohya counts epochs from 1), else with probability
   `caption_dropout_rate`;
2. the caption is cut into tags at `caption_separator` (default ","). The fixed head is the first
   `keep_tokens` tags, or, when the caption holds `keep_tokens_separator`, everything before it
   (and everything after a second one is a fixed tail); the tags in between are flexible;
3. `shuffle_caption` shuffles the flexible tags;
4. each flexible tag is dropped with probability `caption_tag_dropout_rate`;
5. the tags are joined with ", "; a tag holding `secondary_separator` moved and dropped as one tag,
   and its inner separators become `caption_separator`.

Before step 1, `caption_prefix` and `caption_suffix` are put around the caption as written (kohya
concatenates them as strings); between steps 1 and 2, with `enable_wildcard`, one line of a
multi-line caption is picked and each `{a|b}` group becomes one of its options.

The random draws, in this order, all come from `rng`: one `random()` for step 1 when the rate is
set, the wildcard choices, `rng.shuffle(flexible)` for step 3, one `random()` per flexible tag for step 4. The datasets
seed `rng` from (seed, epoch, item) only (`caption_rng`), so a resumed run sees exactly the
captions of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionAugment:
    shuffle: bool = False                 # shuffle_caption
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    separator: str = ","                  # caption_separator
    secondary_separator: str = ""
    dropout_rate: float = 0.0             # caption_dropout_rate
    dropout_every_n_epochs: int = 0       # caption_dropout_every_n_epochs (0: never)
    tag_dropout_rate: float = 0.0         # caption_tag_dropout_rate
    prefix: str = ""                      # caption_prefix, put before the caption as written
    suffix: str = ""                      # caption_suffix
    wildcard: bool = False                # enable_wildcard: one line of a multi-line caption, {a|b} choices

    @property
    def varies(self) -> bool:
        """Whether a caption's text (not only "whole or empty") changes from epoch to epoch."""
        return self.shuffle or self.tag_dropout_rate > 0 or self.wildcard

    @property
    def drops(self) -> bool:
        return self.dropout_rate > 0 or self.dropout_every_n_epochs > 0

    @property
    def active(self) -> bool:
        return self.varies or self.drops or bool(self.secondary_separator or self.keep_tokens_separator
                                                 or self.prefix or self.suffix)


NO_AUGMENT = CaptionAugment()


def caption_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A stream of its own, so turning augmentation on leaves the crop and flip draws unchanged."""
    return random.Random(f"{seed}:{epoch}:{index}:caption")


def split_tags(text: str, separator: str) -> list[str]:
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def caption_parts(caption: str, settings: CaptionAugment) -> tuple[list[str], list[str], list[str]]:
    """(fixed head, flexible tags, fixed tail) of `caption` (step 2)."""
    sep = settings.separator
    if settings.keep_tokens_separator and settings.keep_tokens_separator in caption:
        head, rest = caption.split(settings.keep_tokens_separator, 1)
        middle, _, tail = rest.partition(settings.keep_tokens_separator)
        return split_tags(head, sep), split_tags(middle, sep), split_tags(tail, sep)
    tags = split_tags(caption, sep)
    return tags[:settings.keep_tokens], tags[settings.keep_tokens:], []


def augment_caption(caption: str, settings: CaptionAugment, epoch: int, rng: random.Random) -> str:
    if not settings.active:
        return caption
    caption = settings.prefix + caption + settings.suffix
    if settings.dropout_every_n_epochs and (epoch + 1) % settings.dropout_every_n_epochs == 0:
        return ""
    if settings.dropout_rate and rng.random() < settings.dropout_rate:
        return ""
    if settings.wildcard:
        caption = expand_wildcards(caption, rng)
    if not (settings.varies or settings.secondary_separator or settings.keep_tokens_separator):  # text as written
        return caption
    head, flexible, tail = caption_parts(caption, settings)
    if settings.shuffle:
        rng.shuffle(flexible)
    if settings.tag_dropout_rate:
        flexible = [tag for tag in flexible if rng.random() >= settings.tag_dropout_rate]
    tags = head + flexible + tail
    if settings.secondary_separator:
        tags = [tag.replace(settings.secondary_separator, settings.separator) for tag in tags]
    return ", ".join(tags)


WILDCARD = re.compile(r"\{([^{}]*)\}")


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """enable_wildcard: one line of a multi-line caption (`rng.choice`), then each `{a|b|c}` one
    of its options (`rng.choice` per group, left to right); `{{` and `}}` are literal braces."""
    lines = [line.strip() for line in caption.splitlines() if line.strip()]
    text = rng.choice(lines) if len(lines) > 1 else caption.strip()
    text = text.replace("{{", "\x00").replace("}}", "\x01")
    text = WILDCARD.sub(lambda group: rng.choice(group.group(1).split("|")), text)
    return text.replace("\x00", "{").replace("\x01", "}")


def caption_variants(captions: set[str], settings: CaptionAugment) -> set[str] | None:
    """Every caption the text encoder can see for `captions` under `settings`, or None when the
    tags are shuffled or dropped (then the set depends on the epoch and item; the text encoders
    encode per step)."""
    if settings.varies:
        return None
    steady = dataclasses.replace(settings, dropout_rate=0.0, dropout_every_n_epochs=0)
    found = {augment_caption(caption, steady, 0, random.Random(0)) for caption in captions}
    return found | {""} if settings.drops else found


# More caption variants than this are encoded per step instead of cached (an SD 1.x entry is
# ~240 KB, SDXL ~630 KB: 10,000 entries are a few GB).
MAX_CAPTION_VARIANTS = 10_000


def planned_variants(items: list[tuple[int, list[str], CaptionAugment]], seed: int, epochs: int,
                     limit: int = MAX_CAPTION_VARIANTS) -> set[str] | None:
    """Every caption a run of `epochs` epochs will show, computed ahead from the same draws the
    dataset makes: `items` is one epoch's (item index, the item's captions, its settings). None
    when an item has several captions (which one is drawn shares a stream with the crop) or when
    there are more than `limit`."""
    found: set[str] = set()
    for epoch in range(epochs):
        for index, captions, settings in items:
            if len(captions) != 1:
                return None
            found.add(augment_caption(captions[0], settings, epoch, caption_rng(seed, epoch, index)))
            if len(found) > limit:
                return None
    return found


def short_captions(captions: list[str], settings: CaptionAugment) -> list[int]:
    """Indices of captions with no tag left to shuffle or drop: keep_tokens covers them all (the
    augmentation then leaves them whole; worth a warning naming the images)."""
    if not settings.varies or settings.keep_tokens_separator or not settings.keep_tokens:
        return []
    return [i for i, caption in enumerate(captions) if len(split_tags(caption, settings.separator)) <= settings.keep_tokens]
