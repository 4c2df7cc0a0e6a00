"""The pipeline's run form: one typed parameter model, `PipelineParams`, that Prefect renders as the "Run" form.

A shipped recipe is a choice (an Enum of `deployments/recipes/*.yaml`, read when this module is imported), or a
YAML file on the worker; the settings people change most are typed fields; every other setting is an optional
field of `advanced`, one section per stage, built from the settings models themselves (so the form never drifts
from `mathwizard.config`). An empty field keeps the recipe's value. Precedence: defaults < recipe < the worker's
`.env` and `MATHWIZARD_*` variables < `advanced` < the typed fields.

Programmatic callers build the same input: `PipelineParams(recipe="smoke", home=..., advanced={...})`, or, for the
command line's flags, `PipelineParams.for_command_line(config, home, run_name, lock_wait_s)`. The form's field
descriptions carry no angle brackets: the UI renders descriptions as HTML and swallows `<home>`.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_serializer

from mathwizard.config import Settings, load_settings
from mathwizard.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "deployments" / "recipes"
ADVANCED_SECTIONS = ("prepare", "teacher", "model", "sft", "pairs", "dpo", "eval", "publish", "orchestration")


def form_text(text: str | None) -> str | None:
    """A description as the form can show it: `<home>` becomes `{home}`, arrows and comparisons their symbols."""
    if text is None:
        return None
    text = re.sub(r"<([^<>]+)>", r"{\1}", text)
    for old, new in (("->", "→"), (">=", "≥"), ("<=", "≤"), ("<", "‹"), (">", "›")):
        text = text.replace(old, new)
    return text


def _recipe_summary(path: Path) -> str:
    """The recipe file's first comment line, e.g. 'Smoke recipe: the whole pipeline in minutes on a CPU, ...'."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").split(":", 1)[-1].strip().rstrip(".")
    return path.stem


_SHIPPED = sorted(RECIPES.glob("*.yaml"))
Recipe = Enum("Recipe", {p.stem.replace("-", "_"): p.stem for p in _SHIPPED}, type=str)  # type: ignore[misc]
Recipe.__doc__ = "A recipe shipped in deployments/recipes."
_RECIPE_HELP = "; ".join(f"{p.stem}: {_recipe_summary(p)}" for p in _SHIPPED)


# --------------------------------------------------------------------------------------- form rendering
def _plain_fields(schema: dict[str, Any], _model: Any = None) -> None:
    """Optional fields as their plain type in the JSON schema: the UI then shows a text box or a select, not a
    "str | None" switch; a field left empty is simply not sent, and None (keep the recipe's value) applies."""
    for prop in schema.get("properties", {}).values():
        options = prop.get("anyOf")
        if options and {"type": "null"} in options:
            rest = [option for option in options if option != {"type": "null"}]
            del prop["anyOf"]
            if len(rest) == 1:
                prop.update(rest[0])
            else:
                prop["anyOf"] = rest
        if "default" in prop and prop["default"] is None:
            del prop["default"]


class _Form(BaseModel):
    """A form section: unset fields (None) are left out of its dump, so a run's parameters show what was set."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_plain_fields)

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None and value != {}}


# ----------------------------------------------------------------------------------------------- advanced
def _partial(model: type[BaseModel], name: str) -> type[BaseModel]:
    """`model` with every field optional (None: keep the recipe's value), same types, limits and descriptions."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = _partial(annotation, f"{name}{annotation.__name__.removesuffix('Config')}")
        elif info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]  # ge/gt/pattern limits
        fields[field_name] = (annotation | None, Field(None, description=form_text(info.description)))
    doc = form_text((model.__doc__ or "").strip().splitlines()[0])
    return create_model(name, __base__=_Form, __doc__=doc, **fields)


_SECTIONS = {
    section: _partial(Settings.model_fields[section].annotation, f"Advanced{section.title()}")  # type: ignore[arg-type]
    for section in ADVANCED_SECTIONS
}
Advanced = create_model(
    "Advanced",
    __base__=_Form,
    __doc__="Any other setting, by stage; an empty field keeps the recipe's value.",
    **{
        section: (partial, Field(default_factory=partial, description=partial.__doc__))
        for section, partial in _SECTIONS.items()
    },
)


# -------------------------------------------------------------------------------------------------- the form
class PipelineParams(_Form):
    """What the pipeline runs on: a recipe, the settings changed most often, and any other setting under advanced."""

    model_config = ConfigDict(use_enum_values=True)

    recipe: Recipe | None = Field(  # type: ignore[valid-type]
        None, description=f"A shipped recipe ({_RECIPE_HELP}); empty: the embedded defaults."
    )
    recipe_file: str | None = Field(
        None,
        description="Instead of a shipped recipe, a YAML recipe on the worker: absolute, or relative to its working"
        " directory or to the repository.",
    )
    run_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]+$", description="Folder of this run under home/runs (empty: the recipe's)."
    )
    home: str | None = Field(
        None, description="Artifact root: a folder or fsspec URL such as s3://bucket/path (empty: the worker's)."
    )
    base_model: str | None = Field(
        None, description="The model SFT starts from: a Hub id (google/gemma-3n-E2B-it), a local folder or tiny."
    )
    backend: Literal["auto", "hf", "unsloth"] | None = Field(
        None, description="auto: Unsloth when CUDA and the gpu extra are present, else transformers+PEFT+TRL."
    )
    sft_max_steps: int | None = Field(
        None, ge=1, description="SFT optimizer steps (empty: the recipe's, or its epochs over the data)."
    )
    dpo_max_steps: int | None = Field(
        None, ge=1, description="DPO optimizer steps (empty: the recipe's, or its epochs over the pairs)."
    )
    teacher_model: str | None = Field(None, description="The teacher model's name at its endpoint.")
    teacher_base_url: str | None = Field(
        None, description="The teacher's OpenAI-compatible endpoint (its key comes from the worker's environment)."
    )
    push: bool | None = Field(
        None,
        description="Upload the model and datasets to the Hub (needs a Hub token on the worker; repos private unless"
        " advanced.publish.private is off); empty: the recipe's, which never push.",
    )
    advanced: Advanced = Field(  # type: ignore[valid-type]
        default_factory=Advanced, description="Any other setting, by stage; an empty field keeps the recipe's value."
    )

    @classmethod
    def for_command_line(
        cls,
        config: str | Path | None = None,
        home: str | None = None,
        run_name: str | None = None,
        lock_wait_s: float | None = None,
    ) -> PipelineParams:
        """The input `mathwizard run [--config FILE] [--home ...] [--run-name ...] [--wait S]` gives the flow."""
        advanced = {"orchestration": {"lock_wait_s": lock_wait_s}} if lock_wait_s is not None else {}
        recipe_file = str(Path(config).resolve()) if config is not None else None
        return cls(recipe_file=recipe_file, home=home, run_name=run_name, advanced=advanced)

    def recipe_path(self) -> Path | None:
        if self.recipe and self.recipe_file:
            raise ConfigError(f"give a recipe or a recipe_file, not both (recipe={self.recipe}, {self.recipe_file})")
        if self.recipe:
            return RECIPES / f"{self.recipe}.yaml"
        if self.recipe_file:
            path = Path(self.recipe_file)
            if not path.is_absolute() and not path.exists():
                path = REPO / path  # a worker may start in another directory
            return path
        return None

    def settings(self) -> Settings:
        """The run's settings: defaults < recipe < .env/environment of this process < advanced < typed fields.

        Raises:
            ConfigError: a missing recipe file, or a value the settings refuse (the message names the field).
        """
        base = load_settings(self.recipe_path(), home=self.home, run_name=self.run_name)
        changes = _deep_merge(self.advanced.model_dump(exclude_none=True), self._typed())
        if not changes:
            return base
        try:
            return Settings(**_deep_merge(base.model_dump(), changes))
        except ValidationError as exc:
            raise ConfigError(f"invalid pipeline parameters: {_problems(exc)}") from None

    def _typed(self) -> dict[str, Any]:
        values = {
            ("model", "name"): self.base_model,
            ("model", "backend"): self.backend,
            ("sft", "max_steps"): self.sft_max_steps,
            ("dpo", "max_steps"): self.dpo_max_steps,
            ("teacher", "model"): self.teacher_model,
            ("teacher", "base_url"): self.teacher_base_url,
            ("publish", "push"): self.push,
        }
        typed: dict[str, dict[str, Any]] = {}
        for (section, name), value in values.items():
            if value is not None:
                typed.setdefault(section, {})[name] = value
        return typed


def _deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
