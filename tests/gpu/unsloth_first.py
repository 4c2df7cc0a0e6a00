"""A pytest plugin for the GPU tests: import Unsloth before anything imports transformers (it patches at import).

`tests/conftest.py` imports transformers, and conftest files load before test modules, so the GPU tests load this
plugin first: `python -m pytest -p tests.gpu.unsloth_first -m gpu tests/gpu`. Without CUDA or Unsloth it does nothing.
"""

from __future__ import annotations

import importlib.util
import sys

IMPORTED_FIRST = False  # True when this plugin imported Unsloth while transformers was not yet imported

if importlib.util.find_spec("unsloth") is not None and "unsloth" not in sys.modules:
    import torch

    if torch.cuda.is_available():
        IMPORTED_FIRST = "transformers" not in sys.modules
        from mathwizard.models import backend

        backend.configure_compile("eager")  # the settings' default, read by Unsloth at import
        import unsloth  # noqa: F401
