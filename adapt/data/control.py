"""Conditioning maps for ControlNet: preprocessors, their on-disk cache, and control-image loading.

A preprocessor turns a training image into its conditioning map (e.g. canny
edges).  Maps are computed once at the image's raw size, written as PNGs into
the adapt cache (keyed by the image bytes and the preprocessor settings), and
then served through the ordinary dataset path, so the same crop and flip are
applied to image and map.  No preprocessor needs downloaded weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from adapt.data.dataset import TrainDataset
from adapt.data.images import load_image, to_rgb
from adapt.errors import ConfigError, DataError

# Bump when a preprocessor's arithmetic changes, so cached maps are recomputed.
PREPROCESSOR_VERSION = 1


# --------------------------------------------------------------------------- canny


def _channels(image: Image.Image) -> np.ndarray:
    """RGB as float64 (3, H, W) in 0..255."""
    return np.asarray(to_rgb(image), dtype=np.float64).transpose(2, 0, 1)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflected borders."""
    radius = max(1, int(round(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(x, radius, mode="reflect")
    rows = sum(k[i] * padded[:, i:i + x.shape[1]] for i in range(len(k)))
    return sum(k[i] * rows[i:i + x.shape[0], :] for i in range(len(k)))


def _sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(x, 1, mode="edge")
    h, w = x.shape
    s = lambda dy, dx: p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]  # noqa: E731 - shifted view
    gx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
    gy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
    return gx, gy


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """x[r + dy, c + dx] with zeros outside."""
    out = np.zeros_like(x)
    h, w = x.shape
    out[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = x[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    return out


def canny_edges(image: Image.Image, low: float = 100.0, high: float = 200.0, sigma: float = 0.0) -> np.ndarray:
    """Canny edge detector (Canny 1986, "A Computational Approach to Edge Detection"): a boolean edge mask.

    Gaussian smoothing (optional), Sobel gradients, non-maximum suppression along
    the gradient direction quantised to 0/45/90/135 degrees, double threshold, and
    hysteresis (weak edges kept only when 8-connected to a strong one).  Gradients are
    taken per RGB channel (the strongest wins), thresholds are L2 gradient magnitudes
    on the 0..255 scale OpenCV's Canny uses, so ControlNet's usual 100/200 carry over.  Written here because we may not depend
    on OpenCV or scikit-image.
    """
    if not 0 <= low <= high:
        raise ConfigError(f"canny thresholds need 0 <= low <= high (got low={low}, high={high})")
    # Per-channel gradients, keeping at each pixel the channel with the strongest one: a red shape on a
    # gray ground of equal brightness still has edges (luma-only Canny would miss them).
    grads = [_sobel(_blur(c, sigma) if sigma > 0 else c) for c in _channels(image)]
    mags = np.stack([np.hypot(gx, gy) for gx, gy in grads])
    best = mags.argmax(axis=0)[None]
    gx = np.take_along_axis(np.stack([g[0] for g in grads]), best, 0)[0]
    gy = np.take_along_axis(np.stack([g[1] for g in grads]), best, 0)[0]
    mag = np.take_along_axis(mags, best, 0)[0]
    angle = (np.degrees(np.arctan2(gy, gx)) + 180.0) % 180.0
    bins = (np.round(angle / 45.0).astype(int)) % 4  # 0: horizontal gradient, 1: 45, 2: vertical, 3: 135
    # Neighbours along the gradient, in (row, col) steps; image rows grow downwards like gy.
    steps = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}
    keep = np.zeros(mag.shape, dtype=bool)
    for b, (dy, dx) in steps.items():
        ahead, behind = _shift(mag, dy, dx), _shift(mag, -dy, -dx)
        keep |= (bins == b) & (mag > ahead) & (mag >= behind)
    weak = keep & (mag >= low)
    edges = keep & (mag >= high)
    while True:  # hysteresis by repeated 8-neighbour dilation inside the weak set
        grown = edges.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    grown |= _shift(edges, dy, dx)
        grown &= weak
        if np.array_equal(grown, edges):
            return edges
        edges = grown


def canny(image: Image.Image, low: float = 100.0, high: float = 200.0, sigma: float = 0.0) -> Image.Image:
    """White edges on black, as an RGB image of the input's size (ControlNet's canny convention)."""
    edges = canny_edges(image, low, high, sigma).astype(np.uint8) * 255
    return Image.fromarray(edges, mode="L").convert("RGB")


def as_is(image: Image.Image) -> Image.Image:
    """The image itself is the control (e.g. for recolouring or tile-style control)."""
    return to_rgb(image)


PREPROCESSORS: dict[str, Callable[..., Image.Image]] = {"canny": canny, "as_is": as_is}


def preprocess(name: str, image: Image.Image, **params) -> Image.Image:
    """Apply a named preprocessor; params are its keyword arguments (e.g. low/high/sigma for canny)."""
    if name not in PREPROCESSORS:
        raise ConfigError(f"unknown control preprocessor '{name}'; choose one of: {', '.join(PREPROCESSORS)}")
    return PREPROCESSORS[name](image, **params)


# --------------------------------------------------------------------------- control images at generation


ControlSource = Union[str, Path, Image.Image, np.ndarray]


def load_control_image(source: ControlSource) -> Image.Image:
    """A control image from a path, PIL image or array, as 8-bit RGB (grayscale maps are converted)."""
    if isinstance(source, np.ndarray):
        arr = source
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
        return to_rgb(Image.fromarray(arr))
    if isinstance(source, Image.Image):
        return to_rgb(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"control image {path} does not exist — pass an existing image file (png/jpg/webp)")
    try:
        return load_image(path)
    except Exception as exc:  # PIL raises many types for unreadable files
        raise DataError(f"control image {path} cannot be read as an image ({exc})") from None


# --------------------------------------------------------------------------- datasets with computed maps


class ControlMapDataset(TrainDataset):
    """A TrainDataset whose conditioning references are always files (the cached maps), even for
    items that come from a Hugging Face table."""

    def _source(self, ref, table, row, conditioning):
        if conditioning:
            return ref
        return super()._source(ref, table, row, conditioning)


def _atomic_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def with_control_maps(dataset: TrainDataset, name: str, params: dict, cache_dir: Path,
                      show_progress: bool = True) -> tuple[ControlMapDataset, int]:
    """Every item gets the `name` map of its own image as conditioning (computed once, cached as PNG).

    Returns (dataset, number of maps computed in this call).
    """
    if name not in PREPROCESSORS:
        raise ConfigError(f"unknown control preprocessor '{name}'; choose one of: {', '.join(PREPROCESSORS)}")
    settings = json.dumps({"name": name, "params": params, "version": PREPROCESSOR_VERSION}, sort_keys=True)
    root = Path(cache_dir) / "control" / name
    maps: dict[tuple, str] = {}
    computed = 0
    for i, item in enumerate(tqdm(dataset.items, desc=f"{name} maps", disable=not show_progress)):
        ident = (item.image, item.table, item.row)
        if ident in maps:
            continue  # repeats share their map
        raw, _ = dataset.image_bytes(i)
        key = hashlib.sha256(raw + settings.encode()).hexdigest()
        path = root / key[:2] / f"{key}.png"
        if not path.is_file():
            _atomic_png(preprocess(name, load_image(raw), **params), path)
            computed += 1
        maps[ident] = str(path)
    items = [dataclasses.replace(it, conditioning=maps[(it.image, it.table, it.row)]) for it in dataset.items]
    return ControlMapDataset(items, dataset.settings, dataset.seed, dataset.tables), computed


def with_caption_dropout(dataset: TrainDataset, probability: float) -> TrainDataset:
    """Items whose subset sets no caption_dropout of its own get `probability` (a recipe-wide default)."""
    if probability <= 0:
        return dataset
    items = [it if it.caption_dropout > 0 else dataclasses.replace(it, caption_dropout=probability) for it in dataset.items]
    return type(dataset)(items, dataset.settings, dataset.seed, dataset.tables)


def first_conditioning(dataset: TrainDataset) -> Optional[Image.Image]:
    """The first item's conditioning map after the training transform (for previews), or None."""
    for i, item in enumerate(dataset.items):
        if item.conditioning is not None:
            cond = dataset.item(i, epoch=0, flip=False).get("conditioning_pixel_values")
            if cond is not None:
                arr = (cond.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                return Image.fromarray(arr)
    return None
