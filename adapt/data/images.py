"""Image loading and the training transform (pure PIL/numpy/torch; no torchvision).

`load_image` turns whatever a user's folder holds (phone photos with EXIF
rotation, grayscale scans, palette GIFs, transparent PNGs, 16-bit TIFFs, CMYK
JPEGs) into an upright 8-bit RGB image.  `transform_pair` resizes the shorter
side to the training resolution, crops, optionally flips, and applies the
same geometry to a conditioning image.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Bump when the transform's arithmetic changes, so caches keyed on it are invalidated.
TRANSFORM_VERSION = 1

ImageSource = Union[str, Path, bytes, io.BytesIO, Image.Image]

_WHITE = (255, 255, 255)


def _alpha_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _wide_gray_to_l(img: Image.Image) -> Image.Image:
    """16-bit ('I;16*') and 32-bit ('I', 'F') grayscale to 8-bit.

    PIL's own convert('L') clips these to 0..255, which turns a normal 16-bit
    image almost white; scale the full range instead.  PIL produces 'I' only
    for 16/32-bit sources, so 'I' is read as 16-bit data (0..65535).
    """
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        scale = 1.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0 / 255.0
        out = np.clip(np.nan_to_num(arr) * scale, 0.0, 1.0) * 255.0
    else:
        out = np.clip(arr.astype(np.float64), 0, 65535) * (255.0 / 65535.0)
    return Image.fromarray(np.round(out).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _wide_gray_to_l(img).convert("RGB")
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info:
        return _alpha_on_white(img)
    if mode == "RGB":
        return img
    # L, 1, P (opaque), CMYK, YCbCr, LAB, HSV: PIL's converters are correct for these.
    return img.convert("RGB")


def load_image(source: ImageSource) -> Image.Image:
    """Decode fully (so truncated files fail here, not mid-training), honour EXIF orientation, return RGB."""
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source) or source)
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source) as opened:
        opened.seek(0)  # first frame of animated GIF/WebP and multi-page TIFF
        opened.load()
        # Returns a transposed copy (or a plain copy), detached from the file.
        img = ImageOps.exif_transpose(opened) or opened.copy()
    return to_rgb(img)


def image_size(source: ImageSource) -> tuple[int, int]:
    """(width, height) as `load_image` would return it, read from the header only (no full decode)."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source) as img:
        w, h = img.size
        # EXIF orientations 5-8 rotate by 90 degrees.
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            w, h = h, w
    return w, h


@dataclass(frozen=True)
class TransformSettings:
    """Everything that decides the pixels a training item gets; hashable, so caches can key on it."""

    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    resample: str = "lanczos"
    version: int = TRANSFORM_VERSION

    def as_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        """A stable string for cache keys (sorted JSON)."""
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))


@dataclass
class TransformResult:
    pixel_values: torch.Tensor                       # (3, H, W) float32 in [-1, 1]
    conditioning_pixel_values: Optional[torch.Tensor]  # (3, H, W) float32 in [0, 1], or None
    original_size: tuple[int, int]                   # (height, width) of the loaded image
    crop_top_left: tuple[int, int]                   # (top, left) of the crop in the resized, flipped image
    flipped: bool


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to `resolution` (never below it)."""
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def choose_crop(width: int, height: int, resolution: int, center: bool, rng: Optional[np.random.Generator]) -> tuple[int, int]:
    """(top, left) of a resolution×resolution crop inside a width×height image."""
    if center:
        return int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0))
    if rng is None:
        raise ValueError("a random crop needs an rng (numpy Generator)")
    return int(rng.integers(0, height - resolution + 1)), int(rng.integers(0, width - resolution + 1))


def _resample(name: str) -> int:
    return {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
            "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}[name]


def _geometry(img: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int], flip: bool, resample: int) -> np.ndarray:
    out = img.resize(size, resample=resample) if img.size != size else img
    out = out.crop(box)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def _to_chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(255.0)


def transform_pair(
    image: Image.Image,
    conditioning: Optional[Image.Image] = None,
    *,
    settings: TransformSettings,
    flip: bool = False,
    rng: Optional[np.random.Generator] = None,
) -> TransformResult:
    """Resize (shorter side → resolution), crop, flip if `flip`; the same geometry for both images.

    The flip is an explicit argument (the caller decides, e.g. from a seeded
    rng or to cache both flips).  `rng` is needed only for random crops.
    A conditioning image must have the image's size (the dataset checks that
    before, naming both files); grayscale conditioning becomes RGB.
    """
    res = settings.resolution
    w, h = image.size
    if conditioning is not None and conditioning.size != image.size:
        raise ValueError(f"conditioning image is {conditioning.size[0]}x{conditioning.size[1]}, image is {w}x{h}")
    rw, rh = resized_size(w, h, res)
    top, left = choose_crop(rw, rh, res, settings.center_crop, rng)
    box = (left, top, left + res, top + res)
    resample = _resample(settings.resample)
    pixels = _to_chw(_geometry(to_rgb(image), (rw, rh), box, flip, resample)).mul_(2.0).sub_(1.0)
    cond = None
    if conditioning is not None:
        cond = _to_chw(_geometry(to_rgb(conditioning), (rw, rh), box, flip, resample))
    # Report the crop as seen in the flipped image (flip-then-crop), the convention SDXL's micro-conditioning uses.
    shown_left = rw - left - res if flip else left
    return TransformResult(pixels, cond, (h, w), (top, shown_left), bool(flip))
