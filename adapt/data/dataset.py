"""The training dataset: subsets scanned into records, served as tensors.

`build_dataset` scans every subset of a dataset file (or a plain folder),
reports bad files once, applies repeats, and returns a `TrainDataset`.
Per-item randomness (flip, random crop, caption dropout) is drawn from a
generator seeded by (seed, epoch, index), never from global RNG state, so an
item is reproducible on any worker and after a resume.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from adapt.data.images import TransformSettings, load_image, transform_pair
from adapt.data.sources import HFTable, Item, load_cell, scan_folder, scan_hf
from adapt.data.spec import DatasetSpec, load_dataset_file
from adapt.errors import DataError

# Independent random streams per item, so e.g. turning flips on does not change which captions drop out.
_FLIP, _CROP, _DROPOUT = 0, 1, 2


class BadDataWarning(UserWarning):
    """Some files of a dataset were skipped (listed in the message)."""


class Record(NamedTuple):
    image_path: str
    caption: str               # after template and trigger, before dropout
    role: str
    conditioning_path: Optional[str]


class TrainDataset(Dataset):
    """Yields dicts: pixel_values (3,H,W in [-1,1]), caption, role, image_path, original_size,
    crop_top_left and, for control items, conditioning_pixel_values (3,H,W in [0,1])."""

    def __init__(self, items: list[Item], settings: TransformSettings, seed: int = 0, tables: Optional[list[HFTable]] = None):
        self.items = list(items)
        self.settings = settings
        self.seed = int(seed)
        self.epoch = 0
        self.tables = tables or []
        self.records = [Record(it.image, it.caption, it.role, it.conditioning) for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Call at each epoch start (as with DistributedSampler); changes flips, crops and dropout."""
        self.epoch = int(epoch)

    @property
    def roles(self) -> list[str]:
        return sorted({it.role for it in self.items})

    def subset(self, role: str) -> "TrainDataset":
        """Only the items of one role (e.g. the class images for prior preservation)."""
        return TrainDataset([it for it in self.items if it.role == role], self.settings, self.seed, self.tables)

    def transform_key(self) -> str:
        """Stable string describing the transform; caches key on it."""
        return self.settings.key()

    # -- per-item decisions (exposed so caches can compute them without decoding images)

    def _rng(self, index: int, epoch: Optional[int], stream: int) -> np.random.Generator:
        epoch = self.epoch if epoch is None else epoch
        return np.random.default_rng([self.seed, epoch, index, stream])

    def flip(self, index: int, epoch: Optional[int] = None) -> bool:
        return bool(self.settings.random_flip and self._rng(index, epoch, _FLIP).random() < 0.5)

    def caption(self, index: int, epoch: Optional[int] = None) -> str:
        """The caption after dropout (an empty string when dropped for this (seed, epoch, index))."""
        item = self.items[index]
        if item.caption_dropout > 0 and self._rng(index, epoch, _DROPOUT).random() < item.caption_dropout:
            return ""
        return item.caption

    # -- pixels

    def _source(self, ref: str, table: int, row: int, conditioning: bool):
        if table < 0:
            return ref
        t = self.tables[table]
        return load_cell(t, row, t.conditioning_column if conditioning else t.image_column)

    def image_bytes(self, index: int) -> tuple[bytes, Optional[bytes]]:
        """Raw encoded bytes of the image (and conditioning image), for content hashing."""
        item = self.items[index]
        out = []
        for ref, is_cond in ((item.image, False), (item.conditioning, True)):
            if ref is None:
                out.append(None)
                continue
            src = self._source(ref, item.table, item.row, is_cond)
            out.append(src if isinstance(src, bytes) else Path(src).read_bytes())
        return out[0], out[1]

    def load(self, index: int):
        """(image, conditioning image or None) as upright RGB PIL images."""
        item = self.items[index]
        images = []
        for ref, is_cond in ((item.image, False), (item.conditioning, True)):
            if ref is None:
                images.append(None)
                continue
            try:
                images.append(load_image(self._source(ref, item.table, item.row, is_cond)))
            except Exception as exc:
                raise DataError(f"cannot read {ref} ({exc}); it was readable when the dataset was scanned — "
                                "was it changed or removed during training? Fix or remove it and restart.") from None
        return images[0], images[1]

    def item(self, index: int, epoch: Optional[int] = None, flip: Optional[bool] = None) -> dict:
        """The training example; `flip` overrides the seeded decision (a cache encodes both flips)."""
        rec = self.items[index]
        image, cond = self.load(index)
        if cond is not None and cond.size != image.size:
            raise DataError(f"{rec.image} is {image.size[0]}x{image.size[1]} but its conditioning image {rec.conditioning} is "
                            f"{cond.size[0]}x{cond.size[1]} — give them the same size")
        flip = self.flip(index, epoch) if flip is None else bool(flip)
        crop_rng = None if self.settings.center_crop else self._rng(index, epoch, _CROP)
        out = transform_pair(image, cond, settings=self.settings, flip=flip, rng=crop_rng)
        example = {
            "pixel_values": out.pixel_values,
            "caption": self.caption(index, epoch),
            "role": rec.role,
            "image_path": rec.image,
            "original_size": torch.tensor(out.original_size),
            "crop_top_left": torch.tensor(out.crop_top_left),
            "flipped": out.flipped,
        }
        if out.conditioning_pixel_values is not None:
            example["conditioning_pixel_values"] = out.conditioning_pixel_values
        return example

    def __getitem__(self, index: int) -> dict:
        return self.item(index)


def collate_examples(examples: list[dict]) -> dict:
    """Stack tensors, keep strings as lists; a key missing from some examples (conditioning) is dropped."""
    batch = {}
    for key in examples[0]:
        values = [ex.get(key) for ex in examples]
        if any(v is None for v in values):
            continue
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def _report(skipped: list[tuple[str, str]], strict: bool) -> None:
    if not skipped:
        return
    lines = "\n".join(f"  {path}: {reason}" for path, reason in skipped)
    if strict:
        raise DataError(f"{len(skipped)} unusable file(s) in the dataset (data.strict is on):\n{lines}\n"
                        "Fix: remove or repair them, or set data.strict: false to skip them with a warning.")
    warnings.warn(f"skipped {len(skipped)} unusable file(s) in the dataset:\n{lines}", BadDataWarning, stacklevel=3)


def build_dataset(
    spec_or_path: Union[DatasetSpec, str, Path],
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    strict: bool = False,
    seed: int = 0,
) -> TrainDataset:
    """Scan a dataset file, a folder, or a DatasetSpec into a TrainDataset (repeats applied).

    Bad files are skipped with one `BadDataWarning` listing them all (a
    `DataError` under strict); a subset with no usable image is a DataError
    naming its folder.
    """
    spec = spec_or_path if isinstance(spec_or_path, DatasetSpec) else load_dataset_file(spec_or_path)
    settings = TransformSettings(resolution=int(resolution), center_crop=bool(center_crop), random_flip=bool(random_flip))
    skipped: list[tuple[str, str]] = []
    tables: list[HFTable] = []
    per_subset = []
    for sub in spec.subsets:
        before = len(skipped)
        found = scan_folder(sub, skipped) if sub.path is not None else scan_hf(sub, skipped, tables)
        per_subset.append((sub, found, skipped[before:]))
    _report(skipped, strict)
    items: list[Item] = []
    for sub, found, bad in per_subset:
        if not found:
            listed = "; ".join(f"{Path(p).name}: {reason}" for p, reason in bad[:20])
            why = f" (all {len(bad)} file(s) were skipped — {listed})" if bad else " (it holds no image files)"
            raise DataError(f"no usable images in {sub.source}{why}. Fix: put .png/.jpg/.webp images there with same-name "
                            f"{sub.caption_ext} captions, or point the subset at the right folder.")
        items.extend(found * sub.repeats)
    return TrainDataset(items, settings, seed, tables)
