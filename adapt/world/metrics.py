"""Metrics of the tiny world: pure functions on images, masks and labels.

Every function here is deterministic and free of models, so each can be tested
on hand-made cases with a known answer.  The judge (adapt.world.judge) turns
generated images into predicted labels and features; `adapt eval`
(adapt.world.evaluate) feeds those to the functions below.

Images are accepted as PIL images or uint8/float arrays of shape (H, W, 3);
float arrays are taken to lie in [0, 1].
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- images


def to_float_array(image) -> np.ndarray:
    """An (H, W, 3) float64 array in [0, 1] from a PIL image or an array."""
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    arr = arr.astype(np.float64)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return arr


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB with peak 1.0; +inf for identical images."""
    x, y = to_float_array(a), to_float_array(b)
    _check_same_shape(x, y)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a, b, window_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean structural similarity (Wang, Bovik, Sheikh & Simoncelli 2004, eq. 13).

    Local statistics use an 11x11 Gaussian window with sigma 1.5 (the paper's
    choice), computed per RGB channel over 'valid' positions only (no padding,
    so borders are not biased by invented pixels); the SSIM map is averaged
    over positions and channels.  Written by hand because none of our
    dependencies ships it (torchmetrics/scikit-image are not installed).
    """
    x, y = to_float_array(a), to_float_array(b)
    _check_same_shape(x, y)
    h, w = x.shape[:2]
    size = min(window_size, h, w)
    win = _gaussian_window(size, sigma)[None, None].repeat(3, 1, 1, 1)
    tx = torch.from_numpy(x).permute(2, 0, 1)[None]
    ty = torch.from_numpy(y).permute(2, 0, 1)[None]

    def blur(t):
        return F.conv2d(t, win, groups=3)

    mu_x, mu_y = blur(tx), blur(ty)
    var_x = blur(tx * tx) - mu_x**2
    var_y = blur(ty * ty) - mu_y**2
    cov = blur(tx * ty) - mu_x * mu_y
    c1, c2 = (k1 * 1.0) ** 2, (k2 * 1.0) ** 2  # dynamic range L = 1
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return float((num / den).mean())


def _check_same_shape(x: np.ndarray, y: np.ndarray) -> None:
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")


# --------------------------------------------------------------------------- masks


def foreground_mask(image, threshold: float = 0.2) -> np.ndarray:
    """Foreground by background segmentation: pixels far from the border colour.

    The background colour is the per-channel median of the one-pixel border
    (the generator never lets a shape touch the border); a pixel is
    foreground when its RGB distance to it exceeds `threshold` (in [0, 1]
    units).  The closest plain colour/background pair of the generator
    (purple on gray) is 0.38 apart, so 0.2 sits midway and tolerates the blur
    and noise of generated images.  Holes are kept (a ring stays a ring); see
    `fill_holes` where a silhouette is wanted.
    """
    x = to_float_array(image)
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]], axis=0)
    bg = np.median(border, axis=0)
    dist = np.sqrt(((x - bg) ** 2).sum(axis=-1))
    return dist > threshold


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill regions of False not connected (4-neighbour) to the image border."""
    mask = np.asarray(mask, dtype=bool)
    outside = np.zeros_like(mask)
    free = ~mask
    # seed: free border pixels; then grow by 4-neighbour dilation restricted to free pixels.
    outside[0, :], outside[-1, :] = free[0, :], free[-1, :]
    outside[:, 0] |= free[:, 0]
    outside[:, -1] |= free[:, -1]
    while True:
        grown = outside.copy()
        grown[1:, :] |= outside[:-1, :]
        grown[:-1, :] |= outside[1:, :]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= free
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


def control_map_to_mask(control, threshold: float = 0.5) -> np.ndarray:
    """Object mask from a control map (white silhouette or white edges on black)."""
    x = to_float_array(control).mean(axis=-1)
    return fill_holes(x > threshold)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def _bbox_normalised(mask: np.ndarray, size: int) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
    t = torch.from_numpy(crop)[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy() > 0.5


def shape_iou(mask: np.ndarray, reference: np.ndarray, size: int = 32) -> float:
    """IoU of two masks after each is cropped to its bounding box and resized to size x size.

    Invariant to where and how large the object is drawn, so it measures the
    outline itself.  0.0 when either mask is empty.
    """
    a, b = _bbox_normalised(np.asarray(mask, bool), size), _bbox_normalised(np.asarray(reference, bool), size)
    if a is None or b is None:
        return 0.0
    return mask_iou(a, b)


# --------------------------------------------------------------------------- judged labels


def _get(labels, field: str):
    if isinstance(labels, Mapping):
        return labels.get(field)
    return getattr(labels, field, None)


def _mean(flags: list[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def prompt_adherence(predicted: Sequence, expected: Sequence) -> float | None:
    """Fraction of samples whose judged shape AND colour both equal the prompt's.

    `predicted`/`expected` are parallel sequences of Labels or dicts; samples
    whose prompt names no shape or no colour are skipped (None if none remain).
    """
    flags = [
        _get(p, "shape") == _get(e, "shape") and _get(p, "color") == _get(e, "color")
        for p, e in zip(predicted, expected, strict=True)
        if _get(e, "shape") is not None and _get(e, "color") is not None
    ]
    return _mean(flags)


def position_accuracy(predicted: Sequence, expected: Sequence) -> float | None:
    """Fraction of samples (among prompts that name a position) judged at that position."""
    flags = [
        _get(p, "position") == _get(e, "position")
        for p, e in zip(predicted, expected, strict=True)
        if _get(e, "position") is not None
    ]
    return _mean(flags)


def style_score(predicted: Sequence, style: str = "striped") -> float | None:
    """Fraction of samples judged to be in `style`."""
    return _mean([_get(p, "style") == style for p in predicted])


def class_diversity(shapes: Iterable[str], n_classes: int) -> float:
    """Shannon entropy of the shape distribution, divided by log(n_classes): 0 = one shape, 1 = uniform."""
    counts = np.array(list(Counter(shapes).values()), dtype=np.float64)
    if n_classes < 2 or counts.sum() == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum() / math.log(n_classes))


def subject_fidelity(masks: Sequence[np.ndarray], shapes: Sequence[str], subject: str, reference: np.ndarray) -> float:
    """Mean per-sample subject score: shape_iou(mask, reference) if the judge calls the sample `subject`, else 0.

    Mask IoU alone cannot tell a heart from a circle drawn in the same place
    (their IoU is high), so the judge's shape verdict gates it; the IoU then
    grades how faithful the outline is, independent of placement and size.
    """
    scores = [
        shape_iou(m, reference) if s == subject else 0.0 for m, s in zip(masks, shapes, strict=True)
    ]
    return float(np.mean(scores)) if scores else 0.0


def control_iou(generated_masks: Sequence[np.ndarray], control_masks: Sequence[np.ndarray]) -> float:
    """Mean IoU of each generated foreground mask with its control mask, both as filled silhouettes.

    Filling both sides makes the score the same whether the control map is a
    silhouette or an outline (edges), and a ring compares as its disk.
    """
    ious = [mask_iou(fill_holes(g), fill_holes(c)) for g, c in zip(generated_masks, control_masks, strict=True)]
    return float(np.mean(ious)) if ious else 0.0


# --------------------------------------------------------------------------- Fréchet distance


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) between two Gaussians (Dowson & Landau 1982).

    Tr((S1 S2)^{1/2}) is computed as the sum of square roots of the eigenvalues
    of S1^{1/2} S2 S1^{1/2}, which is symmetric PSD, so no complex sqrtm is
    needed (scipy is not a dependency).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    r1 = _sqrtm_psd(s1)
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    d2 = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    # Rank-deficient covariances (fewer samples than dimensions) leave round-off in the
    # square roots of near-zero eigenvalues; the true value is never negative.
    return float(max(d2, 0.0))


def fd(features_a, features_b) -> float:
    """Fréchet distance between two feature sets (rows = samples), as in FID (Heusel et al. 2017)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"fd needs two (n>=2, d) feature arrays of equal d, got {a.shape} and {b.shape}")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


# --------------------------------------------------------------------------- prompts


_POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "bottom": "bottom",
                   "center": "center", "centre": "center", "middle": "center"}


def parse_prompt(prompt: str, shapes: Sequence[str], colors: Sequence[str], backgrounds: Sequence[str] = (),
                 styles: Sequence[str] = (), sizes: Sequence[str] = ()) -> dict:
    """Expected label fields named by a caption or prompt; a field absent from the text is missing.

    Word-based, so it follows any phrasing: a colour word followed (within two
    words) by 'background'/'backdrop' is the background; the first other
    colour word is the object's colour; shape words match with a plural 's';
    'centre'/'middle' mean center.  Multi-word vocabulary ("light blue") is
    matched before single words.
    """
    text = " " + re.sub(r"[^a-z]+", " ", prompt.lower()) + " "
    found: dict = {}
    for shape in sorted(shapes, key=len, reverse=True):
        if re.search(rf" {re.escape(shape)}s? ", text):
            found["shape"] = shape
            break
    bg_words = sorted(set(backgrounds) | set(colors), key=len, reverse=True)
    bg_match = re.search(rf" ({'|'.join(map(re.escape, bg_words))})( \w+)? (background|backdrop)s? ", text) if bg_words else None
    rest = text
    if bg_match:
        found["background"] = bg_match.group(1)
        rest = text[: bg_match.start()] + " " + text[bg_match.end() :]
    hits = [(m.start(), c) for c in colors for m in re.finditer(rf" {re.escape(c)} ", rest)]
    if hits:
        found["color"] = min(hits)[1]
    for word, pos in _POSITION_WORDS.items():
        if f" {word} " in text:
            found["position"] = pos
            break
    for field, vocab in (("size", sizes), ("style", styles)):
        for word in vocab:
            if f" {word} " in text:
                found[field] = word
    return found
