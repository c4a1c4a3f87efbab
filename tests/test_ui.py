"""The Gradio app (ui/app.py): adapter discovery, the runs-folder restriction, and a launched app driven with
gradio_client — base vs adapted, scale 0 = base, same pixels as `adapt sample`, errors as messages."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from adapt.cli import main as adapt_main  # noqa: E402
from ui.runs import discover_runs, resolve_run  # noqa: E402

STEPS = 2


def train_tiny_lora(base_dir: Path, root: Path) -> Path:
    """A few LoRA steps on the tiny fixture (high lr so the adapter visibly changes the output)."""
    from adapt.config import load_config
    from adapt.testing import make_image_folder
    from adapt.train.trainer import train

    photos = make_image_folder(root / "photos")
    cfg = load_config(None, [], raw={
        "recipe": "lora", "base": {"path": str(base_dir)}, "data": {"dataset": str(photos), "resolution": 32},
        "train": {"steps": 2, "batch_size": 2, "lr": 5e-2, "device": "cpu"},
        "preview": {"prompts": ["a red square"], "steps": STEPS}, "lora": {"rank": 4}})
    return train(cfg, runs_root=root / "runs")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_app(base_dir, runs_dir):
    from ui.app import build_app, launch

    app = build_app(str(base_dir), runs_dir, device="cpu")
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    return app, f"http://127.0.0.1:{port}/"


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def edit_meta(run: Path, **changes) -> None:
    meta = json.loads((run / "adapt_run.json").read_text())
    meta.update(changes)
    (run / "adapt_run.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory):
    """A runs folder with: a trained LoRA, a copy of it (to stack), a copy for another family, a run with a
    pickle file, a link to a run outside the folder; and that outside run."""
    root = tmp_path_factory.mktemp("ui")
    good = train_tiny_lora(tiny_base_dir, root)
    runs = good.parent
    twin = runs / "twin"
    shutil.copytree(good, twin, ignore=shutil.ignore_patterns("checkpoints"))
    edit_meta(twin, trigger="zqx", created="2000-01-01T00:00:00")
    other = runs / "sd2-run"
    shutil.copytree(good, other, ignore=shutil.ignore_patterns("checkpoints"))
    edit_meta(other, family="sd2", fingerprint="0" * 16)
    pickled = runs / "pickled"
    shutil.copytree(good, pickled, ignore=shutil.ignore_patterns("checkpoints"))
    (pickled / "unet.bin").write_bytes(b"not loaded")
    outside = root / "outside-run"
    shutil.copytree(good, outside, ignore=shutil.ignore_patterns("checkpoints"))
    (runs / "sneaky").symlink_to(outside, target_is_directory=True)
    return {"base": tiny_base_dir, "runs": runs, "good": good.name, "outside": outside, "root": root}


@pytest.fixture(scope="module")
def served(world):
    app, url = launch_app(world["base"], world["runs"])
    client = gradio_client.Client(url, verbose=False)
    yield app, client
    client.close() if hasattr(client, "close") else None
    app.close()


def predict(client, *args, api_name):
    """Call an endpoint; inputs that installed recipes declare (e.g. a ControlNet image) are left empty."""
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"][api_name]["parameters"]
    extra = {p["parameter_name"]: None for p in params[len(args):] if not p.get("parameter_has_default")}
    return client.predict(*args, api_name=api_name, **extra)


def compare(client, adapter, scale=1.0, extra=(None, 1.0), seed=3, prompt="a red square", **kw):
    values = dict(adapter=adapter, scale=scale, extra_1=extra[0], weight_1=extra[1], extra_2=None, weight_2=1.0,
                  prompt=prompt, negative_prompt="", seed=seed, steps=STEPS, cfg=5.0, sampler="ddim", size=32)
    values.update(kw)
    return predict(client, *values.values(), api_name="/compare")


# ---- discovery and the runs-folder rule ------------------------------------------------------------
def test_discovery_marks_each_run_usable_or_why_not(world, tiny_base_dir):
    from adapt.base import BaseModel

    facts = BaseModel.load(str(tiny_base_dir)).describe()
    runs = {r.name: r for r in discover_runs(world["runs"], facts)}
    assert set(runs) == {world["good"], "twin", "sd2-run", "pickled", "sneaky"}
    assert runs[world["good"]].usable and runs["twin"].usable and runs["twin"].trigger == "zqx"
    assert "sd2" in runs["sd2-run"].reason and not runs["sd2-run"].usable
    assert "pickle" in runs["pickled"].reason
    assert "outside" in runs["sneaky"].reason and runs["sneaky"].preview is None  # nothing read from outside
    assert runs[world["good"]].preview is not None  # the training preview grid is shown


@pytest.mark.parametrize("name", ["../outside-run", "{outside}", "sneaky", "twin/../../outside-run", "nope", ""])
def test_resolve_run_refuses_anything_but_a_run_inside(world, name):
    from adapt.errors import ModelLoadError

    with pytest.raises(ModelLoadError):
        resolve_run(world["runs"], name.format(outside=world["outside"]))
    assert resolve_run(world["runs"], world["good"]) == (world["runs"] / world["good"]).resolve()


# ---- the launched app, through gradio_client ----------------------------------------------------------
def test_api_lists_adapters_with_reasons(served, world):
    _, client = served
    listed = {a["name"]: a for a in client.predict(api_name="/adapters")}
    assert listed[world["good"]]["usable"] and listed[world["good"]]["recipe"] == "lora"
    assert not listed["sd2-run"]["usable"] and "sd2" in listed["sd2-run"]["reason"]


def test_base_vs_adapted_differ_and_scale_zero_is_the_base(served, world):
    _, client = served
    base, adapted, *_ = compare(client, world["good"], scale=1.0)
    assert pixels(base).shape == (32, 32, 3)
    assert np.abs(pixels(base) - pixels(adapted)).max() > 0
    base0, adapted0, *_ = compare(client, world["good"], scale=0.0)
    assert np.array_equal(pixels(base0), pixels(adapted0))
    assert np.array_equal(pixels(base0), pixels(base))  # the base is untouched by the adapter loaded before


def test_reproduce_commands_give_the_same_pixels_with_adapt_sample(served, world, tmp_path):
    _, client = served
    base, adapted, _, pair_png, text, text_file, status = compare(client, world["good"], scale=0.7, seed=11)
    assert Path(text_file).read_text().strip() == text.strip() and "seed **11**" in status
    assert Image.open(pair_png).size[0] >= 2 * 32
    commands = [shlex.split(line) for line in text.splitlines() if line.startswith("adapt sample")]
    assert len(commands) == 2 and "--adapter" in commands[1] and "0.7" in commands[1]
    for argv, expected in zip(commands, (base, adapted)):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.png"
        argv[argv.index("--out") + 1] = str(out)
        assert adapt_main(argv[1:]) == 0
        assert np.array_equal(pixels(out), pixels(expected))


def test_stacked_adapters_with_weights_and_their_python_reproduction(served, world, tmp_path):
    _, client = served
    _, single, *_ = compare(client, world["good"], scale=1.0)
    _, stacked, _, _, text, _, _ = compare(client, world["good"], scale=1.0, extra=("twin", 0.5))
    assert np.abs(pixels(single) - pixels(stacked)).max() > 0
    assert "attach(pipe" in text and "scale=0.5" in text
    code = text.replace("'adapted.png'", repr(str(tmp_path / "py.png")))
    exec(compile("\n".join(line for line in code.splitlines() if not line.startswith("adapt ")), "reproduce", "exec"), {})
    assert np.array_equal(pixels(tmp_path / "py.png"), pixels(stacked))


def test_strength_sweep_grid(served, world):
    _, client = served
    sheet, png = predict(client, 1, world["good"], 1.0, None, 1.0, None, 1.0, "a red square", "", 5, STEPS, 5.0,
                                "ddim", 32, api_name="/sweep")
    img = pixels(sheet)
    assert np.array_equal(img, pixels(png))
    cell = 96  # 32px images drawn at 96px, 5 columns (scales 0..1) after the row label
    left = img.shape[1] - 5 * cell
    first, last = img[18:18 + cell, left:left + cell], img[18:18 + cell, left + 4 * cell:left + 5 * cell]
    assert img.shape[0] == 18 + cell and np.abs(first - last).max() > 0


def test_request_naming_a_path_outside_the_runs_folder_is_refused(served, world):
    _, client = served
    for name in (str(world["outside"]), "../outside-run", "sneaky"):
        with pytest.raises(gradio_client.exceptions.AppError) as err:
            compare(client, name)
        assert "outside" in str(err.value) or "refused" in str(err.value)
        assert "Traceback" not in str(err.value)


def test_incompatible_or_pickled_adapters_are_refused_with_the_reason(served):
    _, client = served
    with pytest.raises(gradio_client.exceptions.AppError, match="sd2"):
        compare(client, "sd2-run")
    with pytest.raises(gradio_client.exceptions.AppError, match="pickle"):
        compare(client, "pickled")


def test_errors_are_messages_not_tracebacks(served, world):
    _, client = served
    with pytest.raises(gradio_client.exceptions.AppError, match="not a finished run"):
        compare(client, "vanished")
    with pytest.raises(gradio_client.exceptions.AppError, match="multiple of"):
        compare(client, world["good"], size=30)
    with pytest.raises(gradio_client.exceptions.AppError, match="twice"):
        compare(client, world["good"], extra=(world["good"], 1.0))


def test_random_seed_and_refresh_sees_new_runs(served, world):
    app, client = served
    seed = client.predict(api_name="/random_seed")
    assert isinstance(seed, (int, float)) and 0 <= seed < 2**31
    late = world["runs"] / "late"
    shutil.copytree(world["runs"] / world["good"], late, ignore=shutil.ignore_patterns("checkpoints"))
    try:
        assert "late" in {a["name"] for a in client.predict(api_name="/adapters")}
        base, adapted, *_ = compare(client, "late")  # selectable without restarting the app
        assert np.abs(pixels(base) - pixels(adapted)).max() > 0
    finally:
        shutil.rmtree(late)
    base, adapted, *_ = compare(client, world["good"])  # its weights stay loaded; the folder is gone: still fine
    assert np.abs(pixels(base) - pixels(adapted)).max() > 0


def test_switching_adapters_keeps_one_base_and_loads_each_lora_once(served, world):
    app, client = served
    engine = app.adapt_engine
    unet = engine.base.unet
    first_base, *_ = compare(client, world["good"], scale=0.5)
    compare(client, "twin", scale=0.5)
    loaded = set(unet.peft_config)
    for name in (world["good"], "twin", world["good"]):
        base, *_ = compare(client, name, scale=0.5)
    assert engine.base.unet is unet
    assert set(unet.peft_config) == loaded  # one injected adapter per run folder, reused on every switch
    assert np.array_equal(pixels(base), pixels(first_base))


def test_describe_prefills_the_trigger(served):
    app, _ = served
    info, prompt, preview, *_ = app.adapt_handlers.describe("twin", "a red square")
    assert prompt == "zqx a red square" and "zqx" in info and preview is not None
    assert app.adapt_handlers.describe("twin", prompt)[1] == prompt  # not added twice


# ---- the command ------------------------------------------------------------------------------------
def test_command_defaults_are_local_and_private():
    import argparse

    from ui.app import add_arguments, parse_auth
    from adapt.errors import ConfigError

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert args.host == "127.0.0.1" and args.share is False and args.auth is None and args.runs == "runs"
    assert parse_auth("ann:s3:cret") == ("ann", "s3:cret")
    for bad in ("ann", ":x", "ann:"):
        with pytest.raises(ConfigError):
            parse_auth(bad)


def test_recipe_ui_hook_default_routes_values():
    from adapt.errors import ConfigError
    from adapt.recipes import Recipe, UIInput

    class WithInputs(Recipe):
        name = "with_inputs"
        ui_inputs = (UIInput("image", "image", "Control image", required=True),
                     UIInput("strength", "slider", "Strength", default=0.5, target="apply"))

    apply_kw, call_kw, previews = WithInputs.ui_prepare(Path("."), {"image": "img"}, 32, 32)
    assert apply_kw == {"strength": 0.5} and call_kw == {"image": "img"} and previews == []
    with pytest.raises(ConfigError, match="Control image"):
        WithInputs.ui_prepare(Path("."), {}, 32, 32)
    assert Recipe.ui_prepare(Path("."), {"x": 1}, 32, 32) == ({}, {}, [])


def test_app_draws_the_inputs_a_recipe_declares_and_routes_their_values(served, world, monkeypatch):
    import ui.app as ui_app
    from adapt.recipes import UIInput

    declared = [("lora", UIInput("control_note", "text", "A recipe input")), ("elsewhere", UIInput("k", "slider", "K"))]
    monkeypatch.setattr(ui_app, "_recipe_inputs", lambda: declared)
    app, _ = served
    built = ui_app.build_app(engine=app.adapt_engine)
    ids = {c.get("props", {}).get("elem_id") for c in built.config["components"]}
    assert {"input-control_note", "input-k"} <= ids
    values = [world["good"], 1.0, None, 1.0, None, 1.0, "p", "", 1, STEPS, 5.0, "ddim", 32, "hello", 0.3]
    selection, settings = built.adapt_handlers.unpack(values)
    assert selection.inputs == {"lora": {"control_note": "hello"}}  # only recipes of the selected adapters
    assert selection.adapters == [(world["good"], 1.0)] and settings.steps == STEPS and settings.size == 32
