"""The tiny world's procedural generator: small shape images with labels and captions.

Every image is a function of its `Labels` alone (no hidden randomness), so the
judge can be trained on labels, masks can be recomputed exactly, and a seed
reproduces a whole data set.  Shapes are drawn at 4x resolution and
box-filtered down, which gives clean anti-aliased edges at 64 px.

The base world uses `SHAPES` in `"plain"` style only.  `NOVEL_SHAPES` and the
non-plain `STYLES` are reserved for the concept packs (subject and style), so
an adapter that produces them has really learned something new.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "ring")
NOVEL_SHAPES = ("heart",)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 225),
    "yellow": (240, 210, 40),
    "purple": (145, 60, 195),
    "orange": (245, 135, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (238, 238, 238),
    "black": (22, 22, 22),
    "gray": (128, 128, 128),
    "blue": COLORS["blue"],
    "green": COLORS["green"],
}
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")
STYLES = ("plain", "striped")
# The style pack's trigger phrase: a rare word so the base text encoder has no
# prior for it; base-world captions never contain it.  "zwx" is one token of the
# world's tokenizer ("zzstripe" splits into five pieces): measured on the demo
# LoRA (CPU, n=100, seeds 0/1/2), prompt adherence 0.88/0.85/0.78 with "zwx"
# against 0.85/0.77/0.81 (H100, n=200-300) with "zzstripe" at similar style scores.
STYLE_TRIGGER = "in zwx style"
# The subject pack: one novel shape in one colour, named by a rare identifier
# plus a class noun the base knows (DreamBooth, Ruiz et al. 2023).
SUBJECT_TOKEN = "sks"
SUBJECT_CLASS = "shape"
SUBJECT_COLOR = "red"

# Shape centre (fraction of the image side) for each position; far enough
# apart that a large shape at "left" and one at "center" barely overlap.
_CENTERS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
            "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
# Circumradius as a fraction of the image side.
_RADII = {"small": 0.12, "large": 0.21}
_SUPERSAMPLE = 4
_STRIPE_PERIOD = 8 / 64  # fraction of the image side; 8 px at 64 px


@dataclass(frozen=True)
class Labels:
    shape: str
    color: str
    background: str
    position: str
    size: str
    style: str = "plain"


_CHOICES = {"shape": SHAPES, "color": tuple(COLORS), "background": tuple(BACKGROUNDS),
            "position": POSITIONS, "size": SIZES}


def sample_labels(rng: random.Random, **fixed) -> Labels:
    """Draw labels uniformly from the base world; `fixed` overrides any field.

    The background is redrawn until it differs from the shape colour, so a shape
    is never invisible.
    """
    unknown = set(fixed) - {f.name for f in fields(Labels)}
    if unknown:
        raise ValueError(f"unknown label field(s) {sorted(unknown)}")
    values = {name: rng.choice(opts) for name, opts in _CHOICES.items()}
    values["style"] = "plain"
    values.update(fixed)
    if "background" not in fixed:
        while BACKGROUNDS[values["background"]] == COLORS[values["color"]]:
            values["background"] = rng.choice(_CHOICES["background"])
    return Labels(**values)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.78  # half side: a square of similar area to the circle
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, pointing up, centroid at (cx, cy)
        return [(cx + r * math.cos(a), cy - r * math.sin(a))
                for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)]
    if shape == "star":  # five points, inner radius 0.45 r
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy - rad * math.sin(a)))
        return pts
    if shape == "heart":  # the classic parametric heart curve, scaled to radius r
        pts = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 16.5, cy - r * (y + 2.5) / 16.5))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def _draw_silhouette(draw: ImageDraw.ImageDraw, labels: Labels, side: int) -> None:
    """Draw the shape in value 255 on an 'L' canvas of the given side."""
    fx, fy = _CENTERS[labels.position]
    cx, cy, r = fx * side, fy * side, _RADII[labels.size] * side
    if labels.shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if labels.shape == "ring":
            ri = 0.55 * r
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:
        draw.polygon(_polygon(labels.shape, cx, cy, r), fill=255)


def _coverage(labels: Labels, size: int) -> np.ndarray:
    """Fraction of each output pixel covered by the shape (float32 in [0, 1])."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    _draw_silhouette(ImageDraw.Draw(canvas), labels, big)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _fill(labels: Labels, size: int) -> np.ndarray:
    """The shape's fill colour per pixel (H, W, 3 float32), before masking."""
    color = np.array(COLORS[labels.color], dtype=np.float32)
    fill = np.broadcast_to(color, (size, size, 3)).copy()
    if labels.style == "striped":
        # Diagonal stripes alternating the colour with a dark shade of it; the
        # stripes are computed on the supersampled grid and averaged so they
        # stay anti-aliased like the edges.
        big = size * _SUPERSAMPLE
        yy, xx = np.mgrid[0:big, 0:big] + 0.5
        period = _STRIPE_PERIOD * big
        on = (((xx + yy) / period) % 1.0) < 0.5
        frac = on.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))[..., None]
        fill = frac * color + (1 - frac) * color * 0.3
    elif labels.style != "plain":
        raise ValueError(f"unknown style {labels.style!r}")
    return fill


def render(labels: Labels, size: int = 64) -> Image.Image:
    """Render labels to an RGB image of `size` x `size` (deterministic)."""
    cover = _coverage(labels, size)[..., None]
    bg = np.array(BACKGROUNDS[labels.background], dtype=np.float32)
    img = cover * _fill(labels, size) + (1 - cover) * bg
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def render_mask(labels: Labels, size: int = 64) -> np.ndarray:
    """Boolean (size, size) silhouette: pixels at least half covered by the shape."""
    return _coverage(labels, size) >= 0.5


_PHRASINGS = (
    "a {size} {color} {shape} on a {background} background, at the {position}",
    "a {size} {color} {shape} at the {position}, {background} background",
    "{background} background with a {size} {color} {shape} at the {position}",
    "a photo of a {size} {color} {shape} at the {position} on a {background} background",
)


def caption(labels: Labels, rng: random.Random, omit: tuple[str, ...] = ()) -> str:
    """A caption naming every label, in one of a few phrasings.

    `omit` gives a partial prompt in one fixed phrasing: a dropped shape becomes
    the generic word "shape", other dropped fields vanish ("a red shape at the
    left", sometimes prefixed "a photo of").  Non-plain styles append
    `STYLE_TRIGGER`.
    """
    if omit:
        noun = rng.choice(("", "a photo of ")) + " ".join(["a"] + [getattr(labels, f) for f in ("size", "color") if f not in omit]
                        + ["shape" if "shape" in omit else labels.shape])
        pos = "" if "position" in omit else f" at the {labels.position}"
        bg = "" if "background" in omit else f" on a {labels.background} background"
        text = noun + pos + bg
    else:
        text = rng.choice(_PHRASINGS).format(**{f.name: getattr(labels, f.name) for f in fields(Labels)})
    if labels.style != "plain":
        text = f"{text} {STYLE_TRIGGER}"
    return text


def generate(n: int, seed: int, **fixed) -> list[tuple[Image.Image, str, Labels]]:
    """`n` (image, caption, labels) triples from the base world, reproducible for a seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        labels = sample_labels(rng, **fixed)
        out.append((render(labels), caption(labels, rng), labels))
    return out


def subject_caption(labels: Labels, token: str = SUBJECT_TOKEN) -> str:
    """The subject pack's caption: identifier + class noun in place of the shape word."""
    return f"a {labels.size} {token} {SUBJECT_CLASS} at the {labels.position} on a {labels.background} background"


def render_control(labels: Labels, size: int = 64) -> Image.Image:
    """The control map of labels: the shape's silhouette, white on black (RGB)."""
    return Image.fromarray((render_mask(labels, size) * 255).astype(np.uint8)).convert("RGB")


# 3x5 bitmaps of a few letter-like glyphs for the decoder pack's "text" (rows top to bottom).
_GLYPHS = ("111101111101101", "110101110101110", "111100100100111", "101101111101101", "111010010010111",
           "100100100100111", "111101101101111", "111100111001111")


def render_detail(labels: Labels, size: int = 64) -> Image.Image:
    """`render(labels)` plus fine detail that a 4x-downsampling VAE trained on the plain
    world reconstructs poorly: a 1-2 px checker inside the shape, 1 px hairlines on the
    background and a line of tiny glyphs.  Deterministic (the detail is seeded by the labels)."""
    rng = random.Random(f"detail:{labels}")
    img = np.asarray(render(labels, size), dtype=np.float32).copy()
    cover = _coverage(labels, size)[..., None]
    yy, xx = np.mgrid[0:size, 0:size]
    cell = rng.choice((1, 2))
    checker = (((yy // cell) + (xx // cell)) % 2 == 0)[..., None]
    tint = 0.45 * np.array(COLORS[labels.color], dtype=np.float32) + 0.55 * 255
    img = np.where(checker, cover * tint + (1 - cover) * img, img)
    bg = np.array(BACKGROUNDS[labels.background], dtype=np.float32)
    ink = np.full(3, 0.0 if bg.mean() > 110 else 255.0, dtype=np.float32)
    period, vertical = rng.choice((3, 4, 5)), rng.random() < 0.5
    lines = ((xx if vertical else yy) % period == 0)[..., None]
    img = np.where(lines & (cover < 0.01), 0.5 * ink + 0.5 * bg, img)
    # A "word" of glyphs in a band at the top or bottom edge (spacing 1 px).
    y0 = rng.choice((1, size - 7))
    x = rng.randint(1, 6)
    while x + 3 < size - 1:
        glyph = np.array([int(c) for c in rng.choice(_GLYPHS)], dtype=bool).reshape(5, 3)
        on = glyph & (cover[y0:y0 + 5, x:x + 3, 0] < 0.01)
        img[y0:y0 + 5, x:x + 3][on] = ink
        x += 4 + (rng.random() < 0.2) * 3  # occasional word gap
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def with_labels(labels: Labels, **changes) -> Labels:
    """Convenience: a copy of labels with some fields changed."""
    return replace(labels, **changes)
