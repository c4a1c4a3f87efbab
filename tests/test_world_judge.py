"""The embedded judge reads the generator's labels back, and can be rebuilt."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adapt.errors import ModelLoadError
from adapt.world import generator as G
from adapt.world import judge as J


@pytest.fixture(scope="module")
def judge():
    return J.load_judge()


def test_embedded_judge_is_small_and_described():
    files = {p.name: p.stat().st_size for p in J.DEFAULT_JUDGE_DIR.iterdir()}
    assert set(files) >= {"judge.safetensors", "config.json"}
    assert sum(files.values()) < 4 * 2**20
    cfg = json.loads((J.DEFAULT_JUDGE_DIR / "config.json").read_text())
    assert cfg["heads"] == J.default_heads()  # in step with the generator's vocabulary
    assert min(min(per_head.values()) for per_head in cfg["accuracy"].values()) >= 0.98


@pytest.mark.parametrize("augmented", [False, True])
def test_judge_accuracy_on_fresh_images(judge, augmented):
    # Fresh labels (a seed the build never used), all shapes incl. the novel one, both styles.
    acc = J.judge_accuracy(judge, n=300, seed=98765, augmented=augmented)
    assert set(acc) == set(J.default_heads())
    assert min(acc.values()) >= 0.98, acc


def test_judge_reads_base_world_captions_data(judge):
    samples = G.generate(60, seed=4242)
    preds = judge.predict([im for im, _, _ in samples])
    for pred, (_, _, labels) in zip(preds, samples):
        assert (pred["shape"], pred["color"], pred["position"]) == (labels.shape, labels.color, labels.position)


def test_features_are_deterministic_and_separate_shapes(judge):
    base = G.Labels("circle", "red", "white", "center", "large")
    imgs = [G.render(base), G.render(base), G.render(G.with_labels(base, shape="star"))]
    feats = judge.features(imgs)
    assert feats.shape == (3, judge.feature_dim)
    assert np.array_equal(feats[0], feats[1])
    assert not np.allclose(feats[0], feats[2])


def test_judge_accepts_other_sizes_and_arrays(judge):
    labels = G.Labels("triangle", "blue", "white", "left", "large")
    big = G.render(labels, size=128)
    arr = np.asarray(G.render(labels))
    preds = judge.predict([big, arr])
    assert all(p["shape"] == "triangle" and p["position"] == "left" for p in preds)


def test_missing_judge_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="build-judge"):
        J.load_judge(tmp_path)


def test_short_build_runs_end_to_end_and_is_deterministic(tmp_path):
    torch.set_num_threads(1)
    a = J.train_judge(steps=3, seed=7, batch_size=8, max_labels=40, log=None)
    b = J.train_judge(steps=3, seed=7, batch_size=8, max_labels=40, log=None)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    acc = J.build_judge(tmp_path / "judge", steps=2, seed=7, max_labels=40, eval_n=20, log=None)
    assert set(acc) == {"clean", "augmented"}
    loaded = J.load_judge(tmp_path / "judge")
    assert json.loads((tmp_path / "judge" / "config.json").read_text())["train"]["steps"] == 2
    assert len(loaded.predict([G.render(G.Labels("ring", "red", "white", "top", "small"))])) == 1


def test_augment_preserves_range_and_shape():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 64, 64)
    y = J.augment(x, gen)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.equal(x, y)


def test_metrics_on_real_renders_hit_their_calibration(judge):
    """Clean world images are the ceiling of every generation metric; other shapes are the floor of subject fidelity."""
    import random

    from adapt.world import metrics as M

    rng = random.Random(11)
    subject = G.NOVEL_SHAPES[0]
    reference = G.render_mask(G.Labels(subject, "red", "white", "center", "large"))
    hearts = [G.sample_labels(rng, shape=subject) for _ in range(30)]
    others = [G.sample_labels(rng) for _ in range(30)]
    for group, floor, ceiling in ((hearts, 0.9, 1.0), (others, 0.0, 0.0)):
        images = [G.render(lab) for lab in group]
        shapes = [p["shape"] for p in judge.predict(images)]
        score = M.subject_fidelity([M.foreground_mask(im) for im in images], shapes, subject, reference)
        assert floor <= score <= ceiling
    images = [G.render(lab) for lab in others]
    assert M.control_iou([M.foreground_mask(im) for im in images], [G.render_mask(lab) for lab in others]) > 0.9
    assert M.prompt_adherence(judge.predict(images), others) == 1.0
    assert M.fd(judge.features(images[:15]), judge.features(images[:15])) == pytest.approx(0.0, abs=1e-3)
