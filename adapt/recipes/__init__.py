"""The recipe plugin contract and its registry.

A recipe is one module registered under its name.  Built-ins and third-party
packages are found the same way: through the entry-point group `adapt.recipes`
(see pyproject.toml).  The trainer core only calls the methods below; it has no
branch for any particular recipe.
"""
from __future__ import annotations

import difflib
import warnings
import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from adapt.config import Section
from adapt.errors import ConfigError

ENTRY_POINT_GROUP = "adapt.recipes"
_REGISTRY: dict[str, type["Recipe"]] = {}
_DISCOVERED = False


@dataclass(frozen=True)
class UIInput:
    """One extra input a recipe needs at generation time (e.g. ControlNet's control image).

    The app (ui/app.py) builds a control for each and passes its value by `name`: to the pipeline call
    (`target="generate"`, e.g. `image`, `controlnet_conditioning_scale`) or to `apply` (`target="apply"`).
    `Recipe.ui_prepare` may transform the values first (preprocess an uploaded image) and return previews.
    """

    name: str
    kind: Literal["image", "slider", "number", "text", "checkbox"]
    label: str
    default: Any = None
    target: Literal["generate", "apply"] = "generate"
    minimum: float = 0.0
    maximum: float = 1.0
    step: float = 0.05
    info: str = ""
    required: bool = False


class Recipe:
    """Base class of every recipe.

    Lifecycle in `adapt train`: check_config -> __init__ -> setup_data -> prepare
    -> (loss per step) -> save.  `apply` is used by sample/compare/eval/UI on a
    finished run directory.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[Section]] = Section
    #: Dataset roles this recipe trains on; others in the dataset file are an error.
    roles: ClassVar[tuple[str, ...]] = ("instance",)
    #: True if `loss` needs pixel_values even when latents are cached (e.g. a decoder trained on pixels).
    needs_pixels: ClassVar[bool] = False
    #: Set by the trainer before the first step: the shared DiffusionObjective (seeded noise, targets, SNR weights).
    objective = None
    #: Extra generation-time inputs the UI offers for runs of this recipe (none by default; see UIInput).
    ui_inputs: ClassVar[tuple[UIInput, ...]] = ()

    def __init__(self, cfg):
        self.cfg = cfg
        self.rc = cfg.recipe_config

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise ConfigError for impossible combinations of settings."""

    def setup_data(self, base, run_dir: Path, dataset):
        """Hook to extend the dataset before training (e.g. generate class images). Returns the dataset."""
        return dataset

    def prepare(self, base) -> list[torch.nn.Parameter]:
        """Add modules / unfreeze what this recipe trains; return the trainable parameters."""
        raise NotImplementedError

    def loss(self, batch: dict, base) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for one micro-batch and a dict of floats to log."""
        raise NotImplementedError

    def trainable_state_dict(self, base) -> dict[str, torch.Tensor]:
        """Everything trained, for resumable checkpoints."""
        raise NotImplementedError

    def load_trainable_state_dict(self, base, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def save(self, run_dir: Path, base, metadata: dict[str, str]) -> None:
        """Write the final artifact in native, loadable formats."""
        raise NotImplementedError

    def preview_pipeline(self, base, scale: float = 1.0):
        """(pipeline, extra generate() kwargs) showing the model as it trains; default: the base pipeline."""
        return base.pipeline(), {}

    @classmethod
    def ui_prepare(cls, run_dir: Path, values: dict[str, Any], width: int, height: int):
        """UI input values (by UIInput.name) -> (apply kwargs, pipeline-call kwargs, [(caption, PIL preview)]).

        Default: route each value by its UIInput.target, drop unset ones, no previews.  Override to preprocess
        (e.g. turn an uploaded photo into the control map at the generation size and return it as a preview).
        """
        apply_kw, call_kw = {}, {}
        for spec in cls.ui_inputs:
            value = values.get(spec.name, spec.default)
            if value is None:
                if spec.required:
                    raise ConfigError(f"recipe '{cls.name}' needs '{spec.label}' to generate; provide it in the app")
                continue
            (apply_kw if spec.target == "apply" else call_kw)[spec.name] = value
        return apply_kw, call_kw, []

    @classmethod
    def apply(cls, pipe, run_dir: Path, scale: float = 1.0, **kwargs: Any):
        """Apply a finished run to a diffusers pipeline (in place where possible); return the pipeline."""
        raise NotImplementedError


def register_recipe(name: str):
    """Class decorator: register a recipe under `name` (the file name, the YAML `recipe:` value)."""

    def deco(cls: type[Recipe]) -> type[Recipe]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"recipe name '{name}' is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not take the built-ins down with it
            warnings.warn(f"recipe plugin '{ep.name}' ({ep.value}) failed to load: {exc}")
            continue
        if _REGISTRY.get(ep.name) is not cls:
            register_recipe(ep.name)(cls)
    # A source checkout that was not pip-installed has no entry points: import the built-in files.
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if not path.name.startswith("_"):
            importlib.import_module(f"{__name__}.{path.stem}")


def available_recipes() -> dict[str, type[Recipe]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_recipe(name: str, source: str = "<config>") -> type[Recipe]:
    recipes = available_recipes()
    if name not in recipes:
        close = difflib.get_close_matches(name, list(recipes), n=1)
        hint = f"did you mean '{close[0]}'?" if close else "installed recipes: " + ", ".join(recipes)
        raise ConfigError(f"{source}: unknown recipe '{name}' — {hint} (`adapt recipes` lists them)")
    return recipes[name]
