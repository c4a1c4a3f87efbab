"""Each metric on hand-made cases whose answer is known."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from adapt.world import metrics as M


def _disk(size=64, cx=32, cy=32, r=10):
    yy, xx = np.mgrid[:size, :size]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _image(mask, fg=(220, 30, 30), bg=(20, 40, 200)):
    arr = np.empty(mask.shape + (3,), np.uint8)
    arr[:] = bg
    arr[mask] = fg
    return Image.fromarray(arr)


# ---------------------------------------------------------------- psnr / ssim


def test_psnr_identical_is_inf_and_known_value():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert M.psnr(a, a) == math.inf
    x = np.zeros((8, 8, 3))
    y = np.full((8, 8, 3), 0.1)  # mse = 0.01 -> 20 dB
    assert M.psnr(x, y) == pytest.approx(20.0)
    assert M.psnr(Image.fromarray(a), a) == math.inf  # PIL and arrays agree


def test_ssim_identical_constant_and_ordering():
    rng = np.random.default_rng(1)
    a = rng.random((32, 32, 3))
    assert M.ssim(a, a) == pytest.approx(1.0, abs=1e-9)
    # Two constant images: SSIM = (2 mu1 mu2 + c1) / (mu1^2 + mu2^2 + c1) exactly.
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert M.ssim(np.full((20, 20, 3), 0.2), np.full((20, 20, 3), 0.6)) == pytest.approx(expected)
    slightly = np.clip(a + rng.normal(0, 0.02, a.shape), 0, 1)
    heavily = np.clip(a + rng.normal(0, 0.3, a.shape), 0, 1)
    assert 1.0 > M.ssim(a, slightly) > M.ssim(a, heavily)
    # Structure inverted around the same mean: strongly negative correlation term.
    assert M.ssim(a, 1.0 - a) < 0.1


def test_image_metrics_reject_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        M.psnr(np.zeros((8, 8, 3)), np.zeros((9, 8, 3)))


# ---------------------------------------------------------------- masks


def test_mask_iou_known_cases():
    a = np.zeros((10, 10), bool)
    a[:, :5] = True
    b = np.zeros((10, 10), bool)
    b[:, 5:] = True
    assert M.mask_iou(a, a) == 1.0
    assert M.mask_iou(a, b) == 0.0  # disjoint
    c = np.zeros((10, 10), bool)
    c[:, :10] = True
    assert M.mask_iou(a, c) == pytest.approx(0.5)
    assert M.mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0


def test_foreground_mask_recovers_drawn_shape_under_noise():
    mask = _disk()
    img = np.asarray(_image(mask)).astype(np.float64)
    noisy = np.clip(img + np.random.default_rng(2).normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    assert M.mask_iou(M.foreground_mask(noisy), mask) > 0.97
    assert not M.foreground_mask(_image(np.zeros((64, 64), bool))).any()


def test_fill_holes_and_control_map():
    ring = _disk(r=12) & ~_disk(r=6)
    assert M.mask_iou(M.fill_holes(ring), _disk(r=12)) == 1.0
    # An outline-only control map (edges) gives the filled silhouette.
    edges = _disk(r=12) & ~_disk(r=11)
    edge_img = np.where(edges[..., None], 255, 0).astype(np.uint8).repeat(3, -1)
    assert M.mask_iou(M.control_map_to_mask(edge_img), _disk(r=12)) > 0.95
    # An open shape touching the border keeps its outside.
    half = np.zeros((8, 8), bool)
    half[:, 3] = True
    assert M.fill_holes(half).sum() == 8


def test_shape_iou_ignores_place_and_size_but_not_outline():
    small = _disk(cx=15, cy=15, r=6)
    large = _disk(cx=40, cy=40, r=14)
    assert M.shape_iou(small, large) > 0.85
    square = np.zeros((64, 64), bool)
    square[20:40, 20:40] = True
    triangle = np.tril(np.ones((20, 20), bool))
    tri = np.zeros((64, 64), bool)
    tri[5:25, 5:25] = triangle
    assert M.shape_iou(square, square) == 1.0
    assert M.shape_iou(square, tri) == pytest.approx(0.5, abs=0.05)
    assert M.shape_iou(np.zeros((64, 64), bool), square) == 0.0


def test_control_iou_is_mean_over_pairs():
    a, b = _disk(r=8), _disk(cx=10, cy=10, r=5)
    assert M.control_iou([a, a], [a, b]) == pytest.approx(0.5)
    assert M.control_iou([a], [b]) == 0.0
    ring = _disk(r=8) & ~_disk(r=4)
    assert M.control_iou([ring], [a]) == 1.0  # compared as filled silhouettes


# ---------------------------------------------------------------- judged labels


def test_prompt_adherence_needs_shape_and_colour():
    expected = [{"shape": "circle", "color": "red"}] * 4
    predicted = [
        {"shape": "circle", "color": "red"},
        {"shape": "circle", "color": "blue"},
        {"shape": "square", "color": "red"},
        {"shape": "circle", "color": "red", "position": "left"},
    ]
    assert M.prompt_adherence(predicted, expected) == 0.5
    assert M.prompt_adherence(predicted[:1], [{"shape": "circle"}]) is None  # colour not in prompt


def test_position_accuracy_skips_prompts_without_position():
    expected = [{"position": "left"}, {"position": "top"}, {}]
    predicted = [{"position": "left"}, {"position": "bottom"}, {"position": "left"}]
    assert M.position_accuracy(predicted, expected) == 0.5
    assert M.position_accuracy(predicted[2:], expected[2:]) is None


def test_style_score():
    assert M.style_score([{"style": "striped"}, {"style": "plain"}, {"style": "striped"}, {"style": "plain"}]) == 0.5


def test_class_diversity_bounds():
    assert M.class_diversity(["circle"] * 10, n_classes=5) == 0.0
    assert M.class_diversity(["circle", "square", "star", "ring", "triangle"] * 3, n_classes=5) == pytest.approx(1.0)
    two = M.class_diversity(["circle", "square"] * 5, n_classes=4)
    assert two == pytest.approx(0.5)  # log 2 / log 4


def test_subject_fidelity_is_gated_by_judged_shape():
    heart_like = _disk(r=10)
    same_place_other_shape = _disk(r=10)
    score_right = M.subject_fidelity([heart_like], ["heart"], "heart", reference=_disk(cx=20, cy=20, r=5))
    score_wrong = M.subject_fidelity([same_place_other_shape], ["circle"], "heart", reference=heart_like)
    assert score_right > 0.85
    assert score_wrong == 0.0
    assert M.subject_fidelity([heart_like, heart_like], ["heart", "circle"], "heart", heart_like) == 0.5


# ---------------------------------------------------------------- Fréchet distance


def test_fd_identical_sets_and_shifted_means():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(500, 4))
    assert M.fd(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([3.0, 0.0, 4.0, 0.0])
    assert M.fd(a, a + shift) == pytest.approx(25.0, abs=1e-6)  # same covariance: |d|^2


def test_frechet_distance_closed_form_for_diagonal_covariances():
    # Diagonal S1, S2: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(s1) - sqrt(s2))^2.
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    expected = (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert M.frechet_distance(np.zeros(3), s1, np.zeros(3), s2) == pytest.approx(expected)
    with pytest.raises(ValueError):
        M.fd(np.zeros((1, 3)), np.zeros((5, 3)))


# ---------------------------------------------------------------- prompts


VOCAB = dict(shapes=["circle", "square", "triangle", "star", "ring", "heart"],
             colors=["red", "blue", "green", "yellow", "light blue", "white"],
             backgrounds=["white", "black", "gray"], styles=["striped"], sizes=["small", "large"])


@pytest.mark.parametrize("prompt, expected", [
    ("a small red circle on a blue background, at the left",
     dict(shape="circle", color="red", background="blue", position="left", size="small")),
    ("A large striped green star in the centre on a black background",
     dict(shape="star", color="green", background="black", position="center", size="large", style="striped")),
    ("on a white background: a light blue triangle at the top",
     dict(shape="triangle", color="light blue", background="white", position="top")),
    ("two yellow squares, bottom", dict(shape="square", color="yellow", position="bottom")),
    ("a shape", {}),
])
def test_parse_prompt_phrasings(prompt, expected):
    assert M.parse_prompt(prompt, **VOCAB) == expected
