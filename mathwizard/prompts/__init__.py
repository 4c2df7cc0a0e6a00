"""Versioned prompt texts shipped as package data: `mathwizard/prompts/<version>/<name>.txt`.

The text itself (not the version label) goes into cache keys and fingerprints, so editing a prompt
re-asks exactly the items it affects.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources

from mathwizard.errors import ConfigError

FLAWED_STRATEGIES = ("calculation_error", "misapplied_concept", "broken_process")


@cache
def load_prompt(name: str, version: str = "v1") -> str:
    """The text of prompt `name` in prompt set `version`."""
    path = resources.files("mathwizard.prompts").joinpath(version, f"{name}.txt")
    if not path.is_file():
        available = sorted(p.name for p in resources.files("mathwizard.prompts").iterdir() if p.is_dir())
        raise ConfigError(f"no prompt {name!r} in prompt set {version!r} (prompt sets: {', '.join(available)})")
    return path.read_text(encoding="utf-8").strip()


def prompt_digest(*texts: str) -> str:
    return hashlib.sha256("\x1e".join(texts).encode()).hexdigest()[:16]
