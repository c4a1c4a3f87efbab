"""The tiny world's generator: determinism, coverage of every label, masks and captions."""
import random

import numpy as np
import pytest

from adapt.world import generator as g


def test_generate_is_deterministic_for_a_seed():
    a = g.generate(12, seed=3)
    b = g.generate(12, seed=3)
    c = g.generate(12, seed=4)
    assert [(np.asarray(i).tobytes(), t, l) for i, t, l in a] == [(np.asarray(i).tobytes(), t, l) for i, t, l in b]
    assert [l for _, _, l in a] != [l for _, _, l in c]


def test_every_label_value_is_reachable_and_background_differs_from_colour():
    rng = random.Random(0)
    seen = {f: set() for f in ("shape", "color", "background", "position", "size")}
    for _ in range(600):
        lab = g.sample_labels(rng)
        assert g.BACKGROUNDS[lab.background] != g.COLORS[lab.color]
        assert lab.style == "plain" and lab.shape not in g.NOVEL_SHAPES
        for f in seen:
            seen[f].add(getattr(lab, f))
    assert seen["shape"] == set(g.SHAPES)
    assert seen["color"] == set(g.COLORS)
    assert seen["background"] == set(g.BACKGROUNDS)
    assert seen["position"] == set(g.POSITIONS)
    assert seen["size"] == set(g.SIZES)
    assert len(g.COLORS) >= 6


def test_fixed_fields_override_sampling():
    labs = [l for _, _, l in g.generate(10, seed=1, shape="heart", color="red", style="striped")]
    assert all(l.shape == "heart" and l.color == "red" and l.style == "striped" for l in labs)
    with pytest.raises(ValueError):
        g.sample_labels(random.Random(0), colour="red")


@pytest.mark.parametrize("shape", g.SHAPES + g.NOVEL_SHAPES)
def test_mask_matches_rendered_shape(shape):
    lab = g.Labels(shape, "red", "white", "left", "large")
    img = np.asarray(g.render(lab)).astype(int)
    mask = g.render_mask(lab)
    assert img.shape == (64, 64, 3) and mask.shape == (64, 64) and mask.dtype == bool
    d_fg = np.abs(img - np.array(g.COLORS["red"])).sum(-1)
    d_bg = np.abs(img - np.array(g.BACKGROUNDS["white"])).sum(-1)
    # Pixels clearly of the shape's colour are in the mask, clearly background ones are not;
    # only anti-aliased edge pixels (mixed colour) may go either way.
    assert mask[d_fg < d_bg / 3].all() and not mask[d_bg < d_fg / 3].any()
    assert ((d_fg < d_bg / 3) | (d_bg < d_fg / 3)).mean() > 0.9
    # The shape sits in the left half, and the ring has a hole at its centre.
    ys, xs = np.nonzero(mask)
    assert xs.mean() < 24 and 24 < ys.mean() < 40
    assert mask[32, 16] == (shape != "ring")


def test_positions_and_sizes_are_distinct():
    centroids = {}
    for pos in g.POSITIONS:
        ys, xs = np.nonzero(g.render_mask(g.Labels("circle", "red", "black", pos, "small")))
        centroids[pos] = (xs.mean(), ys.mean())
    pts = list(centroids.values())
    assert min(np.hypot(a[0] - b[0], a[1] - b[1]) for i, a in enumerate(pts) for b in pts[i + 1:]) > 10
    small = g.render_mask(g.Labels("square", "red", "black", "center", "small")).sum()
    large = g.render_mask(g.Labels("square", "red", "black", "center", "large")).sum()
    assert large > 2 * small


def test_striped_style_differs_and_keeps_silhouette():
    plain = g.Labels("square", "blue", "white", "center", "large")
    striped = g.with_labels(plain, style="striped")
    a, b = np.asarray(g.render(plain)).astype(int), np.asarray(g.render(striped)).astype(int)
    inside = g.render_mask(plain)
    assert np.abs(a - b)[inside].mean() > 30
    assert (g.render_mask(striped) == inside).all()


def test_caption_names_shape_colour_position_and_trigger_only_for_style():
    rng = random.Random(0)
    for _ in range(40):
        lab = g.sample_labels(rng)
        text = g.caption(lab, rng)
        for word in (lab.shape, lab.color, lab.position, lab.background, lab.size):
            assert word in text
        assert g.STYLE_TRIGGER not in text
    striped = g.Labels("star", "red", "black", "top", "large", "striped")
    assert g.caption(striped, rng).endswith(g.STYLE_TRIGGER)
    partial = g.caption(g.Labels("star", "red", "black", "top", "large"), rng, omit=("shape", "size"))
    assert partial.removeprefix("a photo of ") == "a red shape at the top on a black background"


def test_detail_and_control_renders():
    lab = g.Labels("circle", "blue", "white", "center", "large")
    plain, detail = np.asarray(g.render(lab)).astype(int), np.asarray(g.render_detail(lab)).astype(int)
    assert np.array_equal(np.asarray(g.render_detail(lab)), detail)  # deterministic
    assert np.abs(plain - detail).mean() > 5  # the detail really changes pixels
    control = np.asarray(g.render_control(lab))
    assert control.shape == (64, 64, 3) and set(np.unique(control)) <= {0, 255}
    assert ((control[..., 0] == 255) == g.render_mask(lab)).all()


def test_make_packs_writes_folders_captions_and_dataset_files(tmp_path):
    import yaml

    from adapt.world.packs import SIZES, make_packs

    packs = make_packs(out=tmp_path / "packs", cfg_dir=tmp_path / "cfg", seed=0)
    assert set(packs) == {"style", "subject", "control", "decoder"}
    counts = {name: len(list(folder.glob("*.png"))) for name, folder in packs.items()}
    assert counts == {k: SIZES[k] for k in packs}
    assert len(list((packs["decoder"].parent / "decoder_heldout").glob("*.png"))) == SIZES["decoder_heldout"]
    assert len(list((packs["decoder"].parent / "decoder_plain").glob("*.png"))) == SIZES["decoder"]
    for name, folder in packs.items():
        for png in folder.glob("*.png"):
            assert png.with_suffix(".txt").is_file()
        cfg = yaml.safe_load((tmp_path / "cfg" / f"tinyworld-{name}.yaml").read_text())
        sub = cfg["subsets"][0]
        assert (tmp_path / "cfg" / sub["path"]).resolve() == folder.resolve()
        if name == "control":
            cond = (tmp_path / "cfg" / sub["conditioning_path"]).resolve()
            assert sorted(p.name for p in cond.glob("*.png")) == sorted(p.name for p in folder.glob("*.png"))
    style = [p.read_text() for p in packs["style"].glob("*.txt")]
    subject = [p.read_text() for p in packs["subject"].glob("*.txt")]
    assert all(g.STYLE_TRIGGER in t for t in style)
    assert all(g.SUBJECT_TOKEN in t and g.NOVEL_SHAPES[0] not in t for t in subject)
    assert {"small", "large"} <= {t.split()[1] for t in subject}  # the subject at both sizes


def test_committed_packs_are_what_make_packs_writes(tmp_path):
    """The packs and dataset files in the repository are regenerated bit-identically by `adapt world make-packs`."""
    from pathlib import Path

    from adapt.world.packs import CFG_DIR, PACKS_DIR, make_packs

    make_packs(out=tmp_path / "adapt" / "world" / "packs", cfg_dir=tmp_path / "datasets_cfg", seed=0)
    fresh = sorted(p.relative_to(tmp_path / "adapt" / "world" / "packs") for p in (tmp_path / "adapt" / "world" / "packs").rglob("*") if p.is_file())
    committed = sorted(p.relative_to(PACKS_DIR) for p in Path(PACKS_DIR).rglob("*") if p.is_file())
    assert fresh == committed
    changed = [str(r) for r in fresh if (tmp_path / "adapt" / "world" / "packs" / r).read_bytes() != (Path(PACKS_DIR) / r).read_bytes()]
    assert not changed, f"packs differ from make_packs output: {changed[:5]}"
    for cfg in (tmp_path / "datasets_cfg").glob("tinyworld-*.yaml"):
        assert cfg.read_text() == (Path(CFG_DIR) / cfg.name).read_text(), cfg.name
