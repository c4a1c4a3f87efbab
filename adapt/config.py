"""Typed run configuration: YAML recipe files, dotted CLI overrides, validation.

A recipe file has the shared sections (`base`, `data`, `train`, `preview`) and
one section named after its recipe (e.g. `lora:`), validated by that recipe's
own `Config` class.  Every field is declared once, with a help text; unknown
keys, wrong types and impossible combinations raise `ConfigError` naming the
key, the file and the fix.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adapt.errors import ConfigError

# The embedded tiny-world base (see adapt/world); the default when no base is given.
DEFAULT_BASE = str(Path(__file__).resolve().parent / "assets" / "tinyworld")


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    # coerce_numbers_to_str: a revision or folder name made of digits (YAML reads `1234567` as int) is still text.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class BaseConfig(Section):
    path: str = Field(DEFAULT_BASE, description="Base model: a local diffusers folder, a hub id (needs internet), or a single-file .safetensors checkpoint.")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit) when `path` is a hub id.")
    variant: Optional[str] = Field(None, description="Weight variant to load, e.g. 'fp16', when the folder has one.")
    config_dir: Optional[str] = Field(None, description="For single-file checkpoints offline: a local diffusers folder whose configs describe the model.")
    allow_pickle: bool = Field(False, description="Allow loading pickle checkpoints (.ckpt/.bin/.pt). Pickles can run arbitrary code: only for files you trust.")
    dtype: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="Dtype of the frozen components (trainable weights stay fp32).")


class DataConfig(Section):
    dataset: Union[str, dict, None] = Field(None, description="A dataset file (datasets_cfg/*.yaml), a folder of images with .txt captions, or an inline mapping with a 'subsets:' list.")
    resolution: int = Field(512, gt=0, description="Training resolution in pixels (square crops).")
    center_crop: bool = Field(True, description="Center crop after resizing; false = random crop.")
    random_flip: bool = Field(False, description="Random horizontal flip (both flips are cached when latents are cached).")
    strict: bool = Field(False, description="Fail on unreadable images instead of skipping them with a warning.")
    cache_latents: bool = Field(True, description="Encode images with the frozen VAE once and cache the latents on disk.")
    cache_text_embeddings: bool = Field(True, description="Encode captions with the frozen text encoder once and cache them on disk.")
    cache_dir: Optional[str] = Field(None, description="Where caches live (default: ~/.cache/adapt or $ADAPT_CACHE).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")


class TrainConfig(Section):
    steps: int = Field(1000, gt=0, description="Number of optimizer steps.")
    batch_size: int = Field(1, gt=0, description="Images per micro-batch (per device).")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = Field(
        "constant", description="Learning-rate schedule (diffusers' get_scheduler).")
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = Field("adamw", description="AdamW, bitsandbytes AdamW8bit, or Prodigy (if installed).")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: Optional[float] = Field(1.0, description="Gradient clipping norm; null disables clipping.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Autocast precision; trainable master weights stay fp32.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the UNet (and text encoder if trained).")
    seed: int = Field(42, description="Seed for weights init, noise, timesteps, data order and dropout.")
    snr_gamma: Optional[float] = Field(None, gt=0, description="Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is the paper's value; null = off.")
    noise_offset: float = Field(0.0, ge=0, description="Offset noise strength (adds per-channel constant noise); 0 = off.")
    min_timestep: int = Field(0, ge=0, description="Train only on timesteps >= this (of the scheduler's num_train_timesteps); 0 = from the start.")
    max_timestep: Optional[int] = Field(None, gt=0, description="Train only on timesteps < this; null = up to num_train_timesteps. A style/texture adapter trained on the low-noise end leaves the composition (shapes, layout) to the base.")
    rescale_zero_terminal_snr: bool = Field(False, description="Rescale the noise schedule to zero terminal SNR (Lin et al. 2024); use with v_prediction.")
    checkpoint_every: int = Field(500, gt=0, description="Save a resumable checkpoint every N steps.")
    keep_checkpoints: int = Field(2, gt=0, description="How many checkpoints to keep (oldest removed first).")
    resume: Optional[str] = Field(None, description="'latest' (newest complete checkpoint of this run) or a checkpoint/run path.")
    max_nonfinite_steps: int = Field(5, gt=0, description="Stop after this many consecutive non-finite losses (each one is skipped).")
    log_every: int = Field(10, gt=0, description="Log metrics every N steps.")
    ema_decay: Optional[float] = Field(None, gt=0, lt=1, description="Keep an EMA of the trainable weights with this decay; null = off.")
    device: Optional[str] = Field(None, description="Force a device ('cpu', 'cuda'); default: what accelerate picks.")

    @model_validator(mode="after")
    def _check(self):
        if self.lr_warmup_steps > self.steps:
            raise ValueError(f"lr_warmup_steps ({self.lr_warmup_steps}) is larger than steps ({self.steps}); lower it")
        if self.max_timestep is not None and self.min_timestep >= self.max_timestep:
            raise ValueError(f"min_timestep ({self.min_timestep}) must be below max_timestep ({self.max_timestep})")
        return self


class PreviewConfig(Section):
    every: int = Field(0, ge=0, description="Make a preview grid every N steps (0 = only at the end, if prompts are set).")
    prompts: list[str] = Field(default_factory=list, description="Prompts for preview grids.")
    seed: int = Field(0, description="Seed of the preview images.")
    steps: int = Field(25, gt=0, description="Sampling steps for previews.")
    guidance_scale: float = Field(5.0, ge=0, description="CFG scale for previews.")
    sampler: str = Field("ddim", description="Sampler name for previews (see `adapt sample --help`).")
    scale: float = Field(1.0, description="Adapter scale for previews.")

    @model_validator(mode="after")
    def _check(self):
        if self.every > 0 and not self.prompts:
            raise ValueError("every > 0 needs at least one prompt in preview.prompts")
        return self


class RunConfig(Section):
    recipe: str = Field(..., description="Recipe name (see `adapt recipes`), e.g. lora.")
    output_dir: Optional[str] = Field(None, description="Run directory; default runs/<recipe file stem>-<timestamp>.")
    base: BaseConfig = Field(default_factory=BaseConfig, description="The shared base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation and checkpoints.")
    preview: PreviewConfig = Field(default_factory=PreviewConfig, description="Preview images during training.")

    # Filled by load_config, not by YAML:
    recipe_config: Any = Field(None, exclude=True, description="The recipe's own validated section.")
    source: Optional[str] = Field(None, exclude=True, description="The file this config came from.")

    def dump(self) -> dict:
        """Resolved config as plain data, with the recipe section under its name."""
        out = self.model_dump(mode="json", exclude={"recipe_config", "source"})
        if self.recipe_config is not None:
            out[self.recipe] = self.recipe_config.model_dump(mode="json")
        return out


# Paths that, when written in a YAML file, are relative to that file.
_PATH_KEYS = ("base.path", "base.config_dir", "data.dataset", "data.cache_dir")


def parse_value(text: str) -> Any:
    """Turn an override's text into YAML data ('5e-5' -> float, 'null' -> None, '[a,b]' -> list)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads '5e-5' as a string
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict, overrides: list[str], source: str) -> dict:
    """Apply `a.b=value` overrides to the raw dict, before validation."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. train.lr=5e-5")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(p.strip() for p in parts):
            raise ConfigError(f"override '{item}': empty key name; expected key=value, e.g. train.lr=5e-5")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{'.'.join(parts[:i + 1])}' is a value, not a section")
            node = child
        node[parts[-1]] = parse_value(text)
    return raw


def _known_keys(model: type[BaseModel]) -> list[str]:
    return [k for k, f in model.model_fields.items() if k not in ("recipe_config", "source")]


def _submodel(annotation) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (X, Optional[X], list[X]), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        if isinstance(part, int):  # an index into a list of models
            continue
        field = model.model_fields.get(str(part))
        model = _submodel(getattr(field, "annotation", None))
        if model is None:
            return None
    return model


def _describe(model: type[BaseModel], loc: tuple) -> str:
    parent = _model_at(model, loc[:-1])
    field = parent.model_fields.get(str(loc[-1])) if parent and loc else None
    return field.description if field and field.description else ""


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str, prefix: str = "") -> str:
    """One line per problem: file, dotted key (list items as [i]), what is wrong, how to fix it."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        key = key or prefix.rstrip(".") or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            known = _known_keys(parent) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            fix = f"did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?" if close \
                else f"known keys here: {', '.join(known)}"
            lines.append(f"{source}: unknown key '{key}' — {fix}")
        elif e["type"] == "missing":
            lines.append(f"{source}: missing required key '{key}' — add it ({_describe(model, loc)})")
        else:
            got = e.get("input")
            help_text = _describe(model, loc) if loc and isinstance(loc[-1], str) else ""
            fix = f" — {help_text}" if help_text else ""
            shown = f" (got {got!r})" if got is not None and not isinstance(got, (dict, list)) else ""
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"{source}: '{key}': {msg}{shown}{fix}")
    return "\n".join(lines)


def _resolve_paths(raw: dict, yaml_dir: Path) -> None:
    for dotted in _PATH_KEYS:
        *parents, leaf = dotted.split(".")
        node = raw
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get(leaf), str):
            continue
        value = os.path.expanduser(node[leaf])
        candidate = yaml_dir / value
        if not os.path.isabs(value) and candidate.exists():
            node[leaf] = str(candidate.resolve())


def _inline_dataset(raw: dict, base_dir: Path, source: str) -> None:
    """Validate an inline `data.dataset:` mapping now, with its paths made absolute (so dumps reload anywhere)."""
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("dataset"), dict):
        from adapt.data.spec import dataset_spec_from_dict

        spec = dataset_spec_from_dict(data["dataset"], source=f"{source}: data.dataset", base_dir=base_dir)
        data["dataset"] = spec.model_dump(mode="json", exclude_none=True)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file — check the path (recipe files live in recipes/*.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML — {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (recipe:, base:, data:, train:)")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None, raw: dict | None = None) -> RunConfig:
    """Load a recipe YAML (or a raw dict), apply dotted overrides, validate everything."""
    from adapt.recipes import get_recipe

    source = str(path) if path else "<config>"
    raw = dict(raw) if raw is not None else read_yaml(path)
    if path:
        _resolve_paths(raw, Path(path).resolve().parent)
    apply_overrides(raw, overrides or [], source)
    _inline_dataset(raw, Path(path).resolve().parent if path else Path.cwd(), source)
    name = raw.get("recipe")
    if not name:
        raise ConfigError(f"{source}: missing required key 'recipe' — add e.g. 'recipe: lora' (see `adapt recipes`)")
    recipe_cls = get_recipe(str(name), source=source)
    section = raw.pop(str(name), None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: '{name}' must be a mapping of the recipe's settings")
    for key in list(raw):
        if key not in RunConfig.model_fields or key in ("recipe_config", "source"):
            close = difflib.get_close_matches(key, _known_keys(RunConfig) + [str(name)], n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known sections: {', '.join(_known_keys(RunConfig) + [str(name)])}"
            raise ConfigError(f"{source}: unknown key '{key}' — {hint}")
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, RunConfig, source)) from None
    try:
        cfg.recipe_config = recipe_cls.Config.model_validate(section)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, recipe_cls.Config, source, prefix=f"{name}.")) from None
    cfg.source = source
    recipe_cls.check_config(cfg)
    return cfg
