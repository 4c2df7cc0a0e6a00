"""Versioned prompt texts shipped as package data: `mathwizard/prompts/<version>/<name>.txt`.

The text itself (not the version label) goes into cache keys and fingerprints, so editing a prompt
re-asks exactly the items it affects. A template names its blanks `{question}`, `{solution}`, ...; `fill_prompt`
fills them, and every other brace (`\\boxed{...}`) is plain text, so templates need no `{{}}` escaping.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from importlib import resources

from mathwizard.errors import ConfigError

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


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


def fill_prompt(template: str, **values: str) -> str:
    """`template` with each `{name}` given in `values` replaced by its value; other braces are left as they are.

    One pass over the template, so a value that itself contains `{chosen}` or `}{` is inserted as it is, never
    filled again; a `{name}` not in `values` stays for a later fill (teach's re-ask fills `{problems}` per reply).
    """
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)
