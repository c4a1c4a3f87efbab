"""`adapt eval`: prompts, suites and output, on a tiny random base (numbers are meaningless, plumbing is real)."""
from __future__ import annotations

import json
import random

import pytest

from adapt.cli import main
from adapt.world import evaluate as E
from adapt.world import generator as G


def _eval_json(capsys, *argv) -> dict:
    assert main(["eval", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1  # exactly one JSON object on stdout; progress goes to stderr
    return json.loads(out)


def test_parser_recovers_labels_from_every_caption_phrasing():
    rng = random.Random(0)
    for _ in range(300):
        labels = G.sample_labels(rng, shape=rng.choice(G.SHAPES + G.NOVEL_SHAPES), style=rng.choice(G.STYLES))
        prompt = G.caption(labels, rng)
        found = E.world_expected(prompt)
        assert found == {f: getattr(labels, f) for f in ("shape", "color", "background", "position", "size", "style")}, prompt
    partial = E.world_expected(G.caption(G.Labels("ring", "red", "gray", "top", "small"), rng, omit=("shape",)))
    assert "shape" not in partial and partial["color"] == "red" and partial["position"] == "top"


def test_suite_cases_are_seeded_and_fit_their_suite():
    assert E.suite_cases("adherence", 20, seed=3) == E.suite_cases("adherence", 20, seed=3)
    assert E.suite_cases("adherence", 20, seed=3) != E.suite_cases("adherence", 20, seed=4)
    assert all(G.STYLE_TRIGGER in p and lab.style == "striped" for p, lab in E.suite_cases("style", 10, 0))
    assert all("shape" not in E.world_expected(p) for p, _ in E.suite_cases("class", 10, 0))
    assert all(lab.shape in G.NOVEL_SHAPES and lab.shape not in p for p, lab in E.suite_cases("subject", 10, 0))


def test_adherence_suite_json(tiny_base_dir, capsys):
    result = _eval_json(capsys, "--base", str(tiny_base_dir), "--n", "4", "--steps", "2", "--seed", "5")
    assert {"prompt_adherence", "position_accuracy", "fd"} <= set(result)
    assert "style_score" not in result and "psnr" not in result  # only what the suite computes
    assert 0.0 <= result["prompt_adherence"] <= 1.0 and 0.0 <= result["position_accuracy"] <= 1.0
    assert result["fd"] >= 0.0
    s = result["settings"]
    assert (s["suite"], s["n"], s["steps"], s["seed"], s["sampler"], s["cfg"]) == ("adherence", 4, 2, 5, "ddim", 5.0)
    assert s["base"] == str(tiny_base_dir)


@pytest.fixture(scope="module")
def tiny_base(tiny_base_dir):
    from adapt.base import BaseModel

    return BaseModel.load(str(tiny_base_dir), device="cpu")


def _evaluate(base, suite, n=3, **kw):
    return E.evaluate(E.EvalSettings(suite=suite, n=n, steps=2, **kw), base_model=base)


def test_same_seed_same_numbers(tiny_base):
    first, second = _evaluate(tiny_base, "class", seed=1), _evaluate(tiny_base, "class", seed=1)
    assert first == second
    assert 0.0 <= first["class_diversity"] <= 1.0
    assert sum(first["details"]["shape_counts"].values()) == 3


@pytest.mark.parametrize("suite, keys", [
    ("style", {"style_score", "prompt_adherence", "fd"}),
    ("subject", {"subject_fidelity"}),
    ("control", {"control_iou", "prompt_adherence"}),
    ("decoder", {"psnr", "ssim", "fd"}),
])
def test_other_suites_compute_their_metrics(tiny_base, suite, keys):
    result = _evaluate(tiny_base, suite)
    assert keys <= set(result) <= set(E.METRIC_KEYS) | {"settings", "details"}
    for key in keys & {"style_score", "subject_fidelity", "control_iou", "prompt_adherence", "ssim"}:
        assert -1.0 <= result[key] <= 1.0
    if suite == "control":
        assert "baseline" in result["details"]["note"]  # no --controlnet given
    json.dumps(result, allow_nan=False)


def test_table_output(tiny_base_dir, capsys):
    assert main(["eval", "--base", str(tiny_base_dir), "--n", "2", "--steps", "1", "--suite", "decoder"]) == 0
    out = capsys.readouterr().out
    assert "suite decoder" in out and "psnr" in out and "ssim" in out


def test_grid_of_samples(tiny_base, tmp_path):
    from PIL import Image

    result = _evaluate(tiny_base, "adherence", n=10, grid=str(tmp_path / "g.png"))
    sheet = Image.open(result["details"]["grid"])
    assert sheet.size == (8 * 256, 2 * 256)  # 8 columns, 2 rows of 64 px samples shown 4x


def test_bad_inputs_are_clear_errors(tiny_base_dir, tmp_path, capsys):
    assert main(["eval", "--base", str(tiny_base_dir), "--n", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert main(["eval", "--base", str(tiny_base_dir), "--n", "2", "--adapter", str(tmp_path)]) == 2
    assert "not an adapt run directory" in capsys.readouterr().err
    assert main(["eval", "--base", str(tmp_path / "nowhere"), "--n", "2"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_control_inputs_follow_the_runs_preprocessor(tmp_path):
    import numpy as np

    cases = E.suite_cases("control", 2, seed=0)
    plain = E.control_inputs(str(tmp_path), cases)  # no adapter_info.json: the pack's silhouettes
    assert np.array_equal(np.asarray(plain[0])[..., 0] > 127, G.render_mask(cases[0][1]))
    (tmp_path / "adapter_info.json").write_text(json.dumps(
        {"adapt.preprocessor": "canny", "adapt.preprocessor_params": json.dumps({"low": 100, "high": 200, "sigma": 0})}))
    edges = E.control_inputs(str(tmp_path), cases)
    edge_px = np.asarray(edges[0].convert("L")) > 127
    assert 0 < edge_px.sum() < G.render_mask(cases[0][1]).sum()  # an outline, thinner than the silhouette


def test_subject_prompts_use_the_runs_identifier(tmp_path):
    (tmp_path / "adapter_info.json").write_text(json.dumps({"adapt.identifier": "zwx"}))
    ident = E.run_identifier(str(tmp_path))
    assert ident == "zwx"
    assert all(" zwx " in p for p, _ in E.suite_cases("subject", 5, 0, identifier=ident))
    assert E.run_identifier(None) is None
