"""Load the project's models: 'tiny' (built offline), a Hub id, a local model folder, or a stage's adapter folder.

`load_model(...)` returns `(model, processor)` ready for `generate` (inference) or for adding LoRA (training).
Heavy imports happen inside the functions, so importing this package stays cheap.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mathwizard.errors import ModelError
from mathwizard.models.backend import resolve_backend

log = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_POINTER",
    "HUB_ID",
    "adapter_base",
    "is_adapter_dir",
    "load_model",
    "resolve_backend",
    "resolve_model_path",
    "write_adapter_pointer",
]

# Written next to a saved adapter: which base model it belongs to, so loading the folder loads both.
ADAPTER_POINTER = "mathwizard_adapter.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(name_or_dir: str | Path, *, cache_dir: str | Path | None = None) -> str:
    """A local folder (or Hub id) to load from: 'tiny' is built into the cache on first use.

    Raises:
        ModelError: a path that does not exist, or a name that is neither 'tiny', a folder nor a Hub id.
    """
    from mathwizard.models.tiny import ensure_tiny

    name = str(name_or_dir)
    if name == "tiny":
        return str(ensure_tiny(Path(cache_dir) if cache_dir is not None else None))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise ModelError(f"model path {path} is a file; pass a model folder, an adapter folder, 'tiny' or a Hub id")
    if HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return _hub_adapter_snapshot(name) or name
    raise ModelError(
        f"model path {name} does not exist; pass an existing folder (e.g. <run>/03-sft/adapter), 'tiny' or a Hub id"
    )


def _hub_adapter_snapshot(repo_id: str) -> str | None:
    """A local snapshot of a Hub repo holding an adapter (ours: DPO on an SFT adapter), else None.

    An adapter repo must be on disk whole: its pointer names the SFT adapter inside the same repo. A full model
    repo is left to `from_pretrained`, which fetches only the files it needs.
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        hf_hub_download(repo_id, "adapter_config.json")
    except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError):
        return None  # not an adapter repo, or unreachable: from_pretrained reports it in its own words
    return snapshot_download(repo_id)


def write_adapter_pointer(adapter_dir: Path, base_model: str, backend: str, **extra: Any) -> None:
    """Record the base of a saved adapter: 'tiny', a Hub id, a model folder, or another adapter folder (DPO on SFT).

    Folders are stored absolute and relative to the adapter, so a run folder that moves keeps loading.
    """
    pointer: dict[str, Any] = {"base_model": base_model, "backend": backend, **extra}
    base_path = Path(base_model)
    if base_model != "tiny" and base_path.is_dir():
        pointer["base_model"] = str(base_path.resolve())
        pointer["base_model_relative"] = os.path.relpath(base_path.resolve(), Path(adapter_dir).resolve())
    (Path(adapter_dir) / ADAPTER_POINTER).write_text(json.dumps(pointer, indent=2) + "\n", encoding="utf-8")


def adapter_base(adapter_dir: Path) -> str:
    """What an adapter folder was trained on (its pointer file, else PEFT's base_model_name_or_path)."""
    adapter_dir = Path(adapter_dir)
    try:
        pointer = json.loads((adapter_dir / ADAPTER_POINTER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        base = config.get("base_model_name_or_path")
        if not base:
            raise ModelError(f"{adapter_dir} holds an adapter but names no base model ({ADAPTER_POINTER})") from None
        return base
    relative = pointer.get("base_model_relative")
    if relative and (adapter_dir / relative).is_dir():
        return str((adapter_dir / relative).resolve())
    return pointer["base_model"]


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_model(
    name_or_dir: str | Path,
    backend: str = "auto",
    *,
    for_training: bool,
    dtype: str = "auto",
    load_in_4bit: bool = False,
    cache_dir: str | Path | None = None,
    max_seq_length: int = 2048,
    merge_adapter: bool | None = None,
    kernels: Sequence[str] = (),
) -> tuple[Any, Any]:
    """The model and its processor.

    Args:
        name_or_dir: 'tiny', a Hub id (local HF cache when offline), a model folder, or an adapter folder written
            by the SFT/DPO stages (its base model is loaded first, then the adapter).
        backend: auto | hf | unsloth (see `resolve_backend`).
        for_training: training mode (and a trainable adapter) vs inference mode.
        dtype: auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float16 | float32.
        load_in_4bit: 4-bit base weights (CUDA only).
        cache_dir: where 'tiny' is built and cached (default $MATHWIZARD_MODELS_DIR or ~/.cache/mathwizard/models).
        max_seq_length: longest sequence (Unsloth sizes its buffers with it).
        merge_adapter: merge an adapter into the weights; default: when loading for inference without 4-bit.
        kernels: fused equivalents put on the loaded model (`model.kernels`, see `mathwizard.models.kernels`); those
            in `INFERENCE_ONLY` only without `for_training`. `vision_cache`: a training load starts the process's
            figure cache, an inference load joins it (figures computed by an earlier load of the same tower).

    Raises:
        ModelError: missing path, unloadable model, or a backend this machine cannot run.
    """
    chosen = resolve_backend(backend)
    path = resolve_model_path(name_or_dir, cache_dir=cache_dir)
    merge = (not for_training and not load_in_4bit) if merge_adapter is None else merge_adapter
    options = {"dtype": dtype, "load_in_4bit": load_in_4bit, "cache_dir": cache_dir, "max_seq_length": max_seq_length}
    model, processor = _load(path, chosen, for_training=for_training, merge=merge, **options)
    if kernels:
        from mathwizard.models.kernels import INFERENCE_ONLY, apply_kernels

        chosen = [k for k in kernels if not (for_training and k in INFERENCE_ONLY)]
        apply_kernels(model, chosen, start_figure_cache=for_training)
    return model, processor


def _load(path: str, backend: str, *, for_training: bool, merge: bool, cache_dir: Any, **options: Any):
    """A model folder, or an adapter on top of its base (which may itself be an adapter: merged, then built on)."""
    from mathwizard.models import backend as backends

    backends.activate(backend)  # type: ignore[arg-type]
    if is_adapter_dir(path):
        base = resolve_model_path(adapter_base(Path(path)), cache_dir=cache_dir)
        log.info("loading %s, then its adapter %s", base, path)
        model, _ = _load(base, backend, for_training=for_training, merge=True, cache_dir=cache_dir, **options)
        model = backends.attach_adapter(model, path, backend, for_training=for_training, merge=merge)  # type: ignore[arg-type]
        from transformers import AutoProcessor

        return model, AutoProcessor.from_pretrained(path)
    try:
        return backends.load_pretrained(path, backend, for_training=for_training, **options)  # type: ignore[arg-type]
    except ModelError:
        raise
    except OSError as exc:  # not in the local cache while offline, unreadable files
        raise ModelError(f"cannot load model {path}: {exc}".splitlines()[0]) from exc
