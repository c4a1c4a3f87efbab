"""Dataset files (datasets_cfg/*.yaml): the schema and its loader.

Data live apart from recipes (kohya's idea): a dataset file lists *subsets*,
each a folder of images (with same-name caption files, or a Hugging Face
`metadata.jsonl`) or a Hugging Face dataset, with a role (instance / class /
control), caption settings and repeats.  Relative paths are resolved against
the YAML file's folder.  A plain folder may stand in for a dataset file: it
becomes one instance subset with default settings.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adapt.config import format_validation_error
from adapt.errors import ConfigError

Role = Literal["instance", "class", "control"]

# Files written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class SubsetSpec(BaseModel):
    """One source of training images and their captions."""

    model_config = ConfigDict(extra="forbid")

    path: Optional[str] = Field(None, description="Folder of images with same-name caption files (or a metadata.jsonl), relative to the dataset file.")
    hf: Optional[str] = Field(None, description="Hugging Face dataset: a hub name (needs internet) or a local folder written by `save_to_disk`.")
    split: str = Field("train", description="Split to read from a Hugging Face dataset or a metadata.jsonl folder.")
    role: Role = Field("instance", description="instance (what to learn), class (prior-preservation images) or control (image + conditioning image).")
    caption_ext: str = Field(".txt", description="Extension of the caption file next to each image (same file name, e.g. cat.png + cat.txt).")
    caption_template: Optional[str] = Field(None, description="Caption pattern using {caption} and/or {trigger}, e.g. 'a photo of {trigger}, {caption}'.")
    trigger: Optional[str] = Field(None, description="Trigger word. Without {trigger} in the template it is prepended ('trigger, caption') unless the caption already contains it.")
    default_caption: Optional[str] = Field(None, description="Caption for images that have none; without it a missing caption is an error.")
    repeats: int = Field(1, ge=1, description="How many times each image appears per epoch (balances small subsets against large ones).")
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Probability that an image is shown with an empty caption (for classifier-free guidance).")
    conditioning_path: Optional[str] = Field(None, description="Control subsets: folder of conditioning images with the same file names as the images.")
    image_column: str = Field("image", description="Hugging Face datasets: the column holding the image.")
    caption_column: str = Field("text", description="Hugging Face datasets and metadata.jsonl: the column holding the caption.")
    conditioning_column: str = Field("conditioning_image", description="Control subsets from Hugging Face datasets or metadata.jsonl: the column holding the conditioning image.")

    @model_validator(mode="after")
    def _check(self) -> "SubsetSpec":
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of 'path' (a folder of images) or 'hf' (a Hugging Face dataset)")
        if not self.caption_ext.startswith("."):
            raise ValueError(f"caption_ext must start with a dot, e.g. '.txt' (got {self.caption_ext!r})")
        if self.caption_template is not None:
            _check_template(self.caption_template)
        if self.conditioning_path is not None and self.role != "control":
            raise ValueError(f"conditioning_path is only used by 'role: control' (this subset has role: {self.role})")
        return self

    @property
    def source(self) -> str:
        """The folder or dataset name, for messages."""
        return self.path if self.path is not None else f"hf:{self.hf}"


class DatasetSpec(BaseModel):
    """A dataset file: one or more subsets."""

    model_config = ConfigDict(extra="forbid")

    description: Optional[str] = Field(None, description="Free text: what these images are.")
    subsets: list[SubsetSpec] = Field(..., min_length=1, description="The subsets (folders or Hugging Face datasets) that make up the dataset.")

    def roles(self) -> set[str]:
        return {s.role for s in self.subsets}


def _check_template(template: str) -> None:
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"caption_template {template!r} is not a valid pattern ({exc}); use {{caption}} and {{trigger}}") from None
    unknown = fields - {"caption", "trigger"}
    if unknown:
        raise ValueError(f"caption_template may use only {{caption}} and {{trigger}}, not {', '.join('{' + u + '}' for u in sorted(unknown))}")


# --------------------------------------------------------------------------- errors


# --------------------------------------------------------------------------- loading


def is_saved_hf_dataset(folder: Path) -> bool:
    return folder.is_dir() and any((folder / m).is_file() for m in _SAVED_DATASET_MARKERS)


def _resolve(value: str, base_dir: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base_dir / p).resolve())


def _resolve_hf(value: str, base_dir: Path) -> str:
    """A local folder (relative to the dataset file) wins over a hub name of the same spelling."""
    p = Path(value).expanduser()
    candidate = p if p.is_absolute() else base_dir / p
    looks_local = value.startswith((".", "/", "~")) or candidate.exists()
    return str(candidate.resolve()) if looks_local else value


def dataset_spec_from_dict(raw: object, source: str = "<dataset>", base_dir: str | Path = ".") -> DatasetSpec:
    """Validate a mapping (e.g. an inline `data.dataset:` block) into a DatasetSpec with absolute paths."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a dataset file must be a mapping with a 'subsets:' list (see datasets_cfg/my-photos.yaml)")
    try:
        spec = DatasetSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, DatasetSpec, source)) from None
    base = Path(base_dir).expanduser().resolve()
    subsets = []
    for sub in spec.subsets:
        update = {}
        if sub.path is not None:
            update["path"] = _resolve(sub.path, base)
        if sub.conditioning_path is not None:
            update["conditioning_path"] = _resolve(sub.conditioning_path, base)
        if sub.hf is not None:
            update["hf"] = _resolve_hf(sub.hf, base)
        subsets.append(sub.model_copy(update=update))
    return spec.model_copy(update={"subsets": subsets})


def folder_spec(folder: str | Path) -> DatasetSpec:
    """The inline form: a plain folder is one instance subset with default settings."""
    folder = Path(folder).expanduser().resolve()
    if is_saved_hf_dataset(folder):
        return DatasetSpec(subsets=[SubsetSpec(hf=str(folder))])
    return DatasetSpec(subsets=[SubsetSpec(path=str(folder))])


def load_dataset_file(path: str | Path) -> DatasetSpec:
    """Load a dataset YAML file, or turn a plain folder into a one-subset spec.

    Errors (missing file, bad YAML, unknown or misspelt keys, wrong values)
    become `ConfigError`s naming the file, the key and the fix.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return folder_spec(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such dataset file or folder — pass a datasets_cfg/*.yaml file or a folder of images")
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"{path}: a dataset must be a .yaml file or a folder of images (got a {path.suffix or 'plain'} file)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML — {exc}") from None
    return dataset_spec_from_dict(raw, source=str(path), base_dir=path.resolve().parent)
