"""`adapt demo`: its settings are recipes/tinyworld-lora.yaml's, and a shortened run works end to end."""
import json
from pathlib import Path

import pytest

from adapt.config import load_config
from adapt.world import demo
from adapt.world import generator as G

ROOT = Path(__file__).resolve().parent.parent


def test_demo_settings_are_the_recipe_files():
    from_file = load_config(ROOT / "recipes" / "tinyworld-lora.yaml").dump()
    from_demo = load_config(None, [], raw=demo.demo_raw_config()).dump()
    assert Path(from_file["base"]["path"]).resolve() == Path(from_demo["base"]["path"]).resolve()
    assert from_file["data"]["dataset"] == from_demo["data"]["dataset"]
    for section in ("train", "preview", "lora"):
        assert from_file[section] == from_demo[section], section
    assert {k: v for k, v in from_file["data"].items() if k != "dataset"} == \
        {k: v for k, v in from_demo["data"].items() if k != "dataset"}


@pytest.mark.skipif(not (Path(demo.DEFAULT_BASE) / "model_index.json").is_file(), reason="embedded base not built")
def test_quick_demo_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    from adapt.cli import main

    assert main(["demo", "--quick", "--steps", "2", "--runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    run_dir = Path(out[-1])
    assert (run_dir / "pytorch_lora_weights.safetensors").is_file()
    assert (run_dir / "demo_compare.png").is_file()
    metrics = json.loads((run_dir / "demo_metrics.json").read_text())
    assert set(metrics) == {"base", "adapted"} and "style_score" in metrics["base"]
    meta = json.loads((run_dir / "adapt_run.json").read_text())
    assert meta["trigger"] == G.STYLE_TRIGGER == "in zwx style"
    assert any("adapt ui" in line for line in out)
