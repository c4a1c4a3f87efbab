"""`adapt sample` / `adapt compare` with trained runs: LoRA, ControlNet with a control image, scale order."""
import numpy as np
import pytest
from PIL import Image

from adapt.cli import main
from adapt.config import load_config
from adapt.testing import make_image_folder
from adapt.train.trainer import train


def _train(recipe, base, data, tmp, **section):
    raw = {"recipe": recipe, "base": {"path": str(base)}, "data": {"dataset": str(data), "resolution": 32},
           "train": {"steps": 2, "batch_size": 2, "lr": 1e-2, "seed": 1}, "output_dir": str(tmp / recipe), recipe: section}
    return train(load_config(None, [], raw=raw), runs_root=tmp)


@pytest.fixture(scope="module")
def runs(tiny_base_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_runs")
    photos = make_image_folder(tmp / "photos", n=4, size=32)
    maps = make_image_folder(tmp / "maps", n=4, size=32, seed=3, captions=False)
    control_ds = tmp / "control.yaml"
    control_ds.write_text(f"subsets:\n  - path: {photos}\n    role: control\n    conditioning_path: {maps}\n")
    return {"lora": _train("lora", tiny_base_dir, photos, tmp, rank=4),
            "controlnet": _train("controlnet", tiny_base_dir, control_ds, tmp), "map": maps / "img_000.png"}


def _png(path):
    return np.asarray(Image.open(path)).astype(int)


def test_sample_with_controlnet_and_control_image(runs, tiny_base_dir, tmp_path):
    args = ["sample", "--base", str(tiny_base_dir), "--prompt", "a red square", "--steps", "3", "--seed", "4"]
    assert main(args + ["--out", str(tmp_path / "base.png")]) == 0
    assert main(args + ["--controlnet", str(runs["controlnet"]), "--control", str(runs["map"]),
                        "--control-scale", "0", "--out", str(tmp_path / "zero.png")]) == 0
    assert main(args + ["--controlnet", str(runs["controlnet"]), "--control", str(runs["map"]),
                        "--out", str(tmp_path / "cn.png")]) == 0
    np.testing.assert_array_equal(_png(tmp_path / "zero.png"), _png(tmp_path / "base.png"))
    assert _png(tmp_path / "cn.png").shape == _png(tmp_path / "base.png").shape


def test_compare_base_row_is_the_base_whatever_the_scale_order(runs, tiny_base_dir, tmp_path):
    common = ["compare", "--base", str(tiny_base_dir), "--adapter", str(runs["lora"]), "--prompts", "a red square",
              "--seeds", "1", "2", "--steps", "3"]
    assert main(common + ["--scales", "0", "1", "--out", str(tmp_path / "a.png")]) == 0
    assert main(common + ["--scales", "1", "0", "--out", str(tmp_path / "b.png")]) == 0
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    h = a.shape[0]
    top = 18  # column labels
    row = (h - top) // 2
    np.testing.assert_array_equal(a[top:top + row, 60:], b[top + row:, 60:])  # base row of a == base row of b
    np.testing.assert_array_equal(a[top + row:, 60:], b[top:top + row, 60:])


def test_compare_without_adapter_is_a_clear_error(tiny_base_dir, capsys):
    assert main(["compare", "--base", str(tiny_base_dir), "--prompts", "x"]) == 2
    assert "--adapter" in capsys.readouterr().err
