"""Scanning a subset into items: folders with caption files, metadata.jsonl folders, Hugging Face datasets.

Every image is checked once here, so bad files are found before training
starts: folder images are fully decoded (a truncated JPEG fails only on full
decode); Hugging Face rows have their headers read.  Unusable files are
collected in `skipped` (path, reason); the caller warns once or, under
strict, raises.  Nothing is ever written into a user's folder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from adapt.data.images import IMAGE_EXTENSIONS, image_size, load_image
from adapt.data.spec import SubsetSpec, is_saved_hf_dataset
from adapt.errors import DataError

_MAX_LISTED = 20  # in error messages; the bad-data warning lists every file
_METADATA_FILES = ("metadata.jsonl", "metadata.csv")


@dataclass(frozen=True)
class Item:
    """One training image before repeats. `table`/`row` point into a Hugging Face table (-1: a file on disk)."""

    image: str
    caption: str
    role: str
    conditioning: Optional[str]
    caption_dropout: float
    size: tuple[int, int]
    table: int = -1
    row: int = -1


@dataclass
class HFTable:
    """A Hugging Face dataset with its image columns left undecoded (bytes/paths)."""

    dataset: Any
    image_column: str
    conditioning_column: Optional[str]
    label: str


def _listing(paths: list[str]) -> str:
    shown = ", ".join(paths[:_MAX_LISTED])
    return shown + (f" … and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else "")


# --------------------------------------------------------------------------- captions


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r",(\s*,)+", ",", text)
    return text.strip(" ,")


def compose_caption(caption: str, template: Optional[str] = None, trigger: Optional[str] = None) -> str:
    """Apply a subset's caption template and trigger word.

    Rule: the template (if any) is filled with {caption} and {trigger}.  If a
    trigger is set but the template does not place it, the trigger is
    prepended as "trigger, caption" — unless the caption already contains
    it as a whole word (case-insensitive).  Whitespace and stray commas from
    empty parts are tidied.
    """
    caption = " ".join(caption.split())
    text = template.format(caption=caption, trigger=trigger or "") if template else caption
    places_trigger = bool(template) and "{trigger}" in template
    if trigger and not places_trigger and not re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", text, re.IGNORECASE):
        text = f"{trigger}, {text}"
    return _tidy(text)


def _read_caption(path: Path) -> str:
    return " ".join(path.read_text(encoding="utf-8-sig").split())


# --------------------------------------------------------------------------- conditioning


def _find_conditioning(cond_dir: Path, image: Path) -> Optional[Path]:
    exact = cond_dir / image.name
    if exact.is_file():
        return exact
    for ext in sorted(IMAGE_EXTENSIONS):
        for candidate in (cond_dir / (image.stem + ext), cond_dir / (image.stem + ext.upper())):
            if candidate.is_file():
                return candidate
    return None


def _check_pairs(pairs: list[tuple[str, tuple, str, tuple]]) -> None:
    """Raw sizes must match: a conditioning image is pixel-aligned with its image, so resizing one silently would misalign them."""
    bad = [f"{img} is {s[0]}x{s[1]} but its conditioning image {cond} is {c[0]}x{c[1]}" for img, s, cond, c in pairs if s != c]
    if bad:
        raise DataError(f"{len(bad)} image/conditioning pair(s) differ in size: " + "; ".join(bad[:_MAX_LISTED])
                        + ". Fix: give each conditioning image exactly its image's size (they must be pixel-aligned).")


def _readable(path: Path, skipped: list, what: str = "cannot read image") -> Optional[tuple[int, int]]:
    try:
        return load_image(path).size
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError…)
        skipped.append((str(path), f"{what}: {exc}"))
        return None


# --------------------------------------------------------------------------- folders


def _skip_reason(entry: Path, images: set[str], caption_ext: str) -> str:
    if entry.is_dir():
        return "subfolder (not scanned; add it as its own subset)"
    if entry.name.startswith("."):
        return "hidden or system file, not an image"
    if entry.suffix.lower() == caption_ext.lower():
        return f"caption file without a matching image (no {entry.stem}.png/.jpg/…)"
    return f"not an image (extension '{entry.suffix or 'none'}')"


def scan_folder(sub: SubsetSpec, skipped: list) -> list[Item]:
    """A folder of images with same-name caption files (or a metadata.jsonl, read through `datasets`)."""
    folder = Path(sub.path)
    if not folder.is_dir():
        raise DataError(f"dataset folder {folder} does not exist — check 'path' in the dataset file (relative paths start at the YAML file's folder)")
    if any((folder / m).is_file() for m in _METADATA_FILES):
        return scan_metadata_folder(sub, folder, skipped)
    cond_dir = Path(sub.conditioning_path) if sub.conditioning_path else None
    if sub.role == "control":
        if cond_dir is None:
            raise DataError(f"control subset {folder} has no conditioning_path — set it to the folder of conditioning images (same file names)")
        if not cond_dir.is_dir():
            raise DataError(f"conditioning folder {cond_dir} does not exist — check 'conditioning_path' for subset {folder}")
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    image_stems = {p.stem for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}
    items, no_caption, no_cond, pairs = [], [], [], []
    for entry in entries:
        if not (entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS and not entry.name.startswith(".")):
            is_caption = entry.is_file() and entry.suffix.lower() == sub.caption_ext.lower() and entry.stem in image_stems
            if not is_caption and not (cond_dir and entry.resolve() == cond_dir.resolve()):
                skipped.append((str(entry), _skip_reason(entry, image_stems, sub.caption_ext)))
            continue
        size = _readable(entry, skipped)
        if size is None:
            continue
        cap_file = entry.with_suffix(sub.caption_ext)
        if cap_file.is_file():
            try:
                raw_caption = _read_caption(cap_file)
            except (OSError, UnicodeDecodeError) as exc:
                skipped.append((str(cap_file), f"caption file is not readable UTF-8 text: {exc}"))
                continue
        elif sub.default_caption is not None:
            raw_caption = sub.default_caption
        else:
            no_caption.append(str(entry))
            continue
        cond = None
        if cond_dir is not None:
            cond_path = _find_conditioning(cond_dir, entry)
            if cond_path is None:
                no_cond.append(str(cond_dir / entry.name))
                continue
            cond_size = _readable(cond_path, skipped, "cannot read conditioning image")
            if cond_size is None:
                continue
            pairs.append((str(entry), size, str(cond_path), cond_size))
            cond = str(cond_path)
        caption = compose_caption(raw_caption, sub.caption_template, sub.trigger)
        items.append(Item(str(entry), caption, sub.role, cond, sub.caption_dropout, size))
    if no_caption:
        example = Path(no_caption[0]).with_suffix(sub.caption_ext).name
        raise DataError(f"{len(no_caption)} image(s) in {folder} have no caption file: {_listing(no_caption)}. Fix: add a same-name "
                        f"{sub.caption_ext} file next to each image (e.g. {example}), or set default_caption for this subset in the dataset file.")
    if no_cond:
        raise DataError(f"{len(no_cond)} conditioning image(s) missing: {_listing(no_cond)}. Fix: add a conditioning image with the "
                        f"same file name to {cond_dir} for each image in {folder}, or remove those images.")
    _check_pairs(pairs)
    return items


def _open_imagefolder(folder: Path, split: str):
    """metadata.jsonl through datasets' imagefolder builder, streamed: offline, and no cache written anywhere."""
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split=split, streaming=True)
    for name, feature in (ds.features or {}).items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return ds


def _column(row: dict, wanted: str) -> Optional[str]:
    """Accept both the metadata key ('conditioning_image_file_name') and the column datasets makes of it."""
    for key in (wanted, wanted.removesuffix("_file_name"), wanted.removesuffix("_image"), wanted + "_image"):
        if key in row:
            return key
    return None


def scan_metadata_folder(sub: SubsetSpec, folder: Path, skipped: list) -> list[Item]:
    meta = next(folder / m for m in _METADATA_FILES if (folder / m).is_file())
    try:
        rows = list(_open_imagefolder(folder, sub.split))
    except Exception as exc:
        raise DataError(f"cannot read {meta} with datasets' imagefolder loader ({type(exc).__name__}: {exc}). Fix: one JSON object per "
                        f"line with a 'file_name' key (and '{sub.caption_column}' for the caption).") from None
    items, no_caption, no_cond, pairs = [], [], [], []
    for row in rows:
        image = Path((row.get("image") or {}).get("path") or "")
        if not image.is_file():
            skipped.append((str(image), f"listed in {meta.name} but the file does not exist"))
            continue
        size = _readable(image, skipped)
        if size is None:
            continue
        cap_key = _column(row, sub.caption_column)
        raw_caption = row.get(cap_key) if cap_key else None
        if raw_caption is None:
            if sub.default_caption is None:
                no_caption.append(str(image))
                continue
            raw_caption = sub.default_caption
        cond = None
        if sub.role == "control":
            cond_key = _column(row, sub.conditioning_column)
            value = row.get(cond_key) if cond_key else None
            cond_path = Path(value.get("path") or "") if isinstance(value, dict) else (folder / value if value else None)
            if cond_path is None or not cond_path.is_file():
                no_cond.append(f"{cond_path or '(no ' + sub.conditioning_column + ' in the row)'} (for {image.name})")
                continue
            cond_size = _readable(cond_path, skipped, "cannot read conditioning image")
            if cond_size is None:
                continue
            pairs.append((str(image), size, str(cond_path), cond_size))
            cond = str(cond_path)
        caption = compose_caption(str(raw_caption), sub.caption_template, sub.trigger)
        items.append(Item(str(image), caption, sub.role, cond, sub.caption_dropout, size))
    if no_caption:
        raise DataError(f"{len(no_caption)} image(s) listed in {meta} have no '{sub.caption_column}' value: {_listing(no_caption)}. Fix: add a "
                        f"'{sub.caption_column}' key to each line, set caption_column to the key you use, or set default_caption.")
    if no_cond:
        raise DataError(f"{len(no_cond)} conditioning image(s) missing in {meta}: {_listing(no_cond)}. Fix: add a "
                        f"'{sub.conditioning_column}_file_name' key (or set conditioning_column) pointing at an existing file.")
    _check_pairs(pairs)
    return items


# --------------------------------------------------------------------------- Hugging Face datasets


def _open_hf(sub: SubsetSpec):
    import datasets

    name = sub.hf
    local = Path(name)
    try:
        ds = datasets.load_from_disk(name) if local.is_dir() else datasets.load_dataset(name, split=sub.split)
    except Exception as exc:
        if local.is_dir():
            raise DataError(f"cannot read the dataset saved at {name} ({type(exc).__name__}: {exc}). Fix: point 'hf' at a folder "
                            "written by datasets' save_to_disk, or use 'path' for a folder of images.") from None
        raise DataError(f"cannot load the Hugging Face dataset '{name}' ({type(exc).__name__}: {exc}). Loading by name needs internet: "
                        f"pass a local folder instead ('path:' to images, or 'hf:' to a folder saved with "
                        f"datasets.load_dataset('{name}').save_to_disk(DIR)), or pre-download it into the Hugging Face cache.") from None
    if isinstance(ds, datasets.DatasetDict):
        if sub.split not in ds:
            raise DataError(f"dataset {name} has no split '{sub.split}' (it has: {', '.join(ds)}) — set 'split' in the subset")
        ds = ds[sub.split]
    return ds


def _need_column(ds, column: str, key: str, name: str) -> None:
    if column not in ds.column_names:
        raise DataError(f"dataset {name} has no column '{column}' (columns: {', '.join(ds.column_names)}) — set '{key}' in the subset")


def _cell_source(cell: Any, root: Path) -> Any:
    """An undecoded image cell ({'bytes', 'path'} or a path string) → something `load_image` reads."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        cell = cell.get("path")
    if not cell:
        raise ValueError("empty image cell")
    path = Path(cell)
    return path if path.is_absolute() else root / path


def load_cell(table: HFTable, row: int, column: str) -> Any:
    root = Path(table.label) if Path(table.label).is_dir() else Path(".")
    return _cell_source(table.dataset[row][column], root)


def scan_hf(sub: SubsetSpec, skipped: list, tables: list[HFTable]) -> list[Item]:
    """Rows of a Hugging Face dataset. Images are header-checked here (a full decode of a large hub
    dataset would take too long); one that still fails later raises a DataError naming its row."""
    import datasets

    local = Path(sub.hf)
    if local.is_dir() and not is_saved_hf_dataset(local):
        return scan_folder(sub.model_copy(update={"path": sub.hf, "hf": None}), skipped)
    ds = _open_hf(sub)
    _need_column(ds, sub.image_column, "image_column", sub.hf)
    has_caption = sub.caption_column in ds.column_names
    if not has_caption and sub.default_caption is None:
        _need_column(ds, sub.caption_column, "caption_column", sub.hf)
    cond_col = sub.conditioning_column if sub.role == "control" else None
    if cond_col:
        _need_column(ds, cond_col, "conditioning_column", sub.hf)
    for col in (sub.image_column, cond_col):
        if col and isinstance(ds.features[col], datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
    tables.append(HFTable(ds, sub.image_column, cond_col, sub.hf))
    t = len(tables) - 1
    root = local if local.is_dir() else Path(".")
    columns = [c for c in (sub.image_column, sub.caption_column if has_caption else None, cond_col) if c]
    items, no_caption, pairs = [], [], []
    for i, row in enumerate(ds.select_columns(columns)):
        label = f"hf:{sub.hf}[{sub.split}]#{i}"
        try:
            size = image_size(_cell_source(row[sub.image_column], root))
            cond_size = image_size(_cell_source(row[cond_col], root)) if cond_col else None
        except Exception as exc:
            skipped.append((label, f"cannot read image: {exc}"))
            continue
        raw_caption = row.get(sub.caption_column) if has_caption else None
        if raw_caption is None:
            if sub.default_caption is None:
                no_caption.append(label)
                continue
            raw_caption = sub.default_caption
        cond = f"{label}:{cond_col}" if cond_col else None
        if cond_col:
            pairs.append((label, size, cond, cond_size))
        caption = compose_caption(str(raw_caption), sub.caption_template, sub.trigger)
        items.append(Item(label, caption, sub.role, cond, sub.caption_dropout, size, table=t, row=i))
    if no_caption:
        raise DataError(f"{len(no_caption)} row(s) of {sub.hf} have no caption in column '{sub.caption_column}': {_listing(no_caption)}. "
                        "Fix: set caption_column to the right column, or set default_caption.")
    _check_pairs(pairs)
    return items
