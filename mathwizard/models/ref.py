"""The one resolver of model references: what a stage loads for 'tiny', a Hub id, a model folder, an adapter folder
or a stage folder, and the identity that goes into the fingerprints of the stages that train or generate with it.

A stage folder (03-sft, 05-dpo) means its `adapter/` and is identified by its manifest's fingerprint, not its path, so
a moved run keeps its fingerprints; an adapter folder outside a run by the checksum of its weights; 'tiny' by the
builder's version; anything else by its name. How a model is loaded (backend, dtype, 4-bit) comes from the settings'
`ModelConfig` and is added by `identity`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mathwizard.errors import ModelError

if TYPE_CHECKING:
    from mathwizard.config import ModelConfig
    from mathwizard.generation import ModelGenerator

ADAPTER_DIR = "adapter"
_MAX_CHAIN = 8  # adapters on adapters: DPO on SFT is 2; more means a loop in hand-edited pointer files


@dataclass(frozen=True)
class ModelRef:
    """A resolved model reference: where to load it from, and what identifies its weights."""

    location: str  # for load_model: 'tiny', a Hub id, an absolute model folder or an absolute adapter folder
    stage: str | None = None  # the stage whose folder it came from (sft, dpo), if any
    fingerprint: str | None = None  # that stage's manifest fingerprint, or the adapter weights' sha256

    @property
    def is_adapter(self) -> bool:
        from mathwizard.models import is_adapter_dir

        return is_adapter_dir(self.location)

    def source_identity(self) -> dict[str, Any]:
        """What decides the weights: the stage fingerprint, the adapter checksum, or the name (and tiny's version)."""
        if self.fingerprint:
            return {"stage": self.stage, "fingerprint": self.fingerprint}
        if self.location == "tiny":  # the built model changes with the builder's version
            from mathwizard.models.tiny import TINY_VERSION

            return {"name": "tiny", "tiny_version": TINY_VERSION}
        return {"name": self.location}

    def identity(self, model: ModelConfig) -> dict[str, Any]:
        """The fingerprint input of a stage that loads this model with `model`'s loading settings.

        Speed-only settings (compile scope, decode mode, kernels) are left out: they change how fast, not what comes
        out.
        """
        return {
            **self.source_identity(),
            "backend": model.backend,
            "dtype": model.dtype,
            "load_in_4bit": model.load_in_4bit,
        }

    def chain(self) -> list[str]:
        """The bases below this model, nearest first: [SFT adapter, base model] for a DPO adapter; [] for a model."""
        from mathwizard.models import adapter_base, is_adapter_dir

        chain: list[str] = []
        current = self.location
        while is_adapter_dir(current):
            base = adapter_base(Path(current))
            if base in chain or len(chain) >= _MAX_CHAIN:
                raise ModelError(f"the adapter chain below {self.location} loops or is deeper than {_MAX_CHAIN}")
            chain.append(base)
            current = base
        return chain

    @property
    def root(self) -> str:
        """The model at the bottom of the adapter chain (a Hub id, 'tiny' or a model folder)."""
        chain = self.chain()
        return chain[-1] if chain else self.location

    def generator(self, model: ModelConfig, batch_size: int) -> ModelGenerator:
        """This model loaded for batched generation with `model`'s backend, dtype, 4-bit, compile and decode."""
        from mathwizard.generation import load_generator
        from mathwizard.models.backend import configure_compile

        if self.root == "tiny":
            import torch

            if not torch.cuda.is_available():
                torch.set_num_threads(1)  # as in training: the tiny model decodes about twice as fast on one thread
        configure_compile(model.compile)
        return load_generator(
            self.location,
            backend=model.backend,
            dtype=model.dtype,
            load_in_4bit=model.load_in_4bit,
            batch_size=batch_size,
            decode=model.decode,
            kernels=model.kernels,
        )


def resolve(reference: str | Path, *, adapter: bool = False) -> ModelRef:
    """Resolve 'tiny', a Hub id, a model folder, an adapter folder or a stage folder (its `adapter/`).

    With `adapter`, the reference must hold an adapter (DPO starts from the SFT adapter).

    Raises:
        ModelError: a path that does not exist, or (with `adapter`) a folder without an adapter.
        DataError: a stage folder whose manifest lists files that are missing or cut short (run its stage again).
    """
    from mathwizard.manifest import file_sha256, read_manifest, require_manifest
    from mathwizard.models import is_adapter_dir

    text = str(reference)
    path = Path(text).expanduser()
    if text == "tiny" or not path.exists():
        if adapter:
            raise ModelError(f"{text} is not an adapter folder; pass the SFT stage folder (e.g. <run>/03-sft)")
        if text != "tiny" and (text.startswith((".", "/", "~")) or not _looks_like_hub_id(text)):
            raise ModelError(f"model path {text} does not exist; pass an existing folder, 'tiny' or a Hub id")
        return ModelRef(location=text)
    if not path.is_dir():
        raise ModelError(f"model path {path} is a file; pass a model folder, an adapter folder, 'tiny' or a Hub id")
    path = path.resolve()
    if is_adapter_dir(path / ADAPTER_DIR):
        stage_dir: Path | None = path
        path = path / ADAPTER_DIR
    elif is_adapter_dir(path):
        stage_dir = path.parent if path.name == ADAPTER_DIR else None
    elif adapter:
        raise ModelError(f"{path} holds no adapter (adapter_config.json); run `mathwizard sft` first")
    else:
        return ModelRef(location=str(path))
    manifest = read_manifest(stage_dir) if stage_dir is not None else None
    if manifest is not None:
        require_manifest(stage_dir, manifest.stage)  # type: ignore[arg-type]  # damaged: one line naming its command
        return ModelRef(location=str(path), stage=manifest.stage, fingerprint=manifest.fingerprint)
    weights = sorted(path.glob("adapter_model.*"))
    return ModelRef(location=str(path), stage="adapter", fingerprint=file_sha256(weights[0]) if weights else None)


def _looks_like_hub_id(text: str) -> bool:
    from mathwizard.models import HUB_ID

    return bool(HUB_ID.match(text))
