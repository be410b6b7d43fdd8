"""Where a base model is loaded from: a Hub id or local folder, plus revision/variant/cache."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSource:
    path: str
    revision: str | None = None
    variant: str | None = None
    cache_dir: str | None = None

    def hub_kwargs(self) -> dict:
        """For configs and tokenizers, which have no weight variants."""
        return {"revision": self.revision, "cache_dir": self.cache_dir}

    def weight_kwargs(self) -> dict:
        return {**self.hub_kwargs(), "variant": self.variant}
