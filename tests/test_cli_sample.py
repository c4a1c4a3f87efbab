"""`adapt sample` and the CLI's handling of user errors (exit status 2, no traceback)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapt.cli import main
from adapt.infer import sampler_names


def sample(base_dir, out: Path, *extra: str, seed: int = 1, prompt: str = "a red square") -> int:
    return main(["sample", "--base", str(base_dir), "--prompt", prompt, "--seed", str(seed), "--steps", "3",
                 "--device", "cpu", "--out", str(out), *extra])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def reference(tiny_base_dir, tmp_path_factory):
    """One `adapt sample` run (seed 1, default cfg) that several tests compare against."""
    out = tmp_path_factory.mktemp("ref") / "nested" / "ref.png"
    assert sample(tiny_base_dir, out) == 0
    return out


def test_sample_writes_a_png_of_the_native_size(reference):
    with Image.open(reference) as im:
        assert im.format == "PNG" and im.size == (32, 32)
    assert pixels(reference).std() > 0  # not a blank image


def test_sample_prints_the_output_path(tiny_base_dir, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert sample(tiny_base_dir, out, "--sampler", "euler_a") == 0
    assert capsys.readouterr().out.strip() == str(out)


def test_same_seed_same_bytes_different_seed_different_image(tiny_base_dir, reference, tmp_path):
    again, other = tmp_path / "again.png", tmp_path / "other.png"
    assert sample(tiny_base_dir, again, seed=1) == 0
    assert sample(tiny_base_dir, other, seed=2) == 0
    assert again.read_bytes() == reference.read_bytes()
    assert np.abs(pixels(reference) - pixels(other)).max() > 0


def test_negative_prompt_and_cfg_change_the_image(tiny_base_dir, reference, tmp_path):
    neg, cfg1 = tmp_path / "neg.png", tmp_path / "cfg1.png"
    assert sample(tiny_base_dir, neg, "--negative-prompt", "a blue circle") == 0
    assert sample(tiny_base_dir, cfg1, "--cfg", "1.0") == 0
    assert np.abs(pixels(reference) - pixels(neg)).max() > 0
    assert np.abs(pixels(reference) - pixels(cfg1)).max() > 0


def test_size_option(tiny_base_dir, tmp_path):
    out = tmp_path / "big.png"
    assert sample(tiny_base_dir, out, "--size", "48") == 0
    assert Image.open(out).size == (48, 48)


@pytest.fixture(scope="module")
def pipe_v(tiny_base_dir_v):
    from adapt.base import BaseModel

    return BaseModel.load(str(tiny_base_dir_v)).pipeline()


@pytest.mark.parametrize("sampler", sampler_names())
def test_every_sampler_generates(pipe_v, sampler):
    # Through generate() (what `adapt sample --sampler` calls), on a v_prediction base, without reloading it.
    from adapt.infer import generate

    image, = generate(pipe_v, ["a red square"], [3], steps=3, sampler=sampler)
    img = np.asarray(image, dtype=np.int16)
    assert img.shape == (32, 32, 3) and img.std() > 0
    assert pipe_v.scheduler.config.prediction_type == "v_prediction"  # the sampler keeps the base's parametrisation


def test_ancestral_sampler_is_seeded(pipe_v):
    from adapt.infer import generate

    a, b = (np.asarray(generate(pipe_v, ["a red square"], [5], steps=3, sampler="euler_a")[0]) for _ in range(2))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("alias,cls", [("euler_ancestral", "EulerAncestralDiscreteScheduler"),
                                       ("DPM++ 2M Karras", "DPMSolverMultistepScheduler"), ("DDIM", "DDIMScheduler")])
def test_sampler_aliases(pipe_v, alias, cls):
    from adapt.infer import make_scheduler

    assert type(make_scheduler(alias, pipe_v.scheduler.config)).__name__ == cls


def test_unknown_sampler_name_in_generate(pipe_v):
    from adapt.errors import ConfigError
    from adapt.infer import generate

    with pytest.raises(ConfigError, match="plms.*ddim"):
        generate(pipe_v, ["x"], [0], steps=2, sampler="plms")


# ---- user errors -------------------------------------------------------------------------
def test_missing_base_exits_2_without_traceback(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert sample(missing, tmp_path / "x.png") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(missing) in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_pickle_base_refused_by_cli_then_allowed(tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"junk")
    assert sample(ckpt, tmp_path / "x.png") == 2
    err = capsys.readouterr().err
    assert "refusing" in err and str(ckpt) in err and "Traceback" not in err
    assert sample(ckpt, tmp_path / "x.png", "--allow-pickle") == 2
    err = capsys.readouterr().err
    assert "refusing" not in err and "Traceback" not in err


def test_unknown_sampler_is_an_argparse_error(tiny_base_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        sample(tiny_base_dir, tmp_path / "x.png", "--sampler", "plms")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "plms" in err and "ddim" in err


def test_sample_requires_a_prompt(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sample", "--steps", "3"])
    assert info.value.code == 2 and "--prompt" in capsys.readouterr().err


def test_compare_without_adapter_is_a_user_error(tiny_base_dir, capsys):
    assert main(["compare", "--base", str(tiny_base_dir), "--prompts", "a red square"]) == 2
    err = capsys.readouterr().err
    assert "--adapter" in err and "Traceback" not in err


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("train", "sample", "compare", "export", "eval", "ui", "demo"):
        assert command in out


def _console_script() -> str | None:
    beside = Path(sys.executable).parent / "adapt"
    return str(beside) if beside.exists() else shutil.which("adapt")


@pytest.mark.skipif(_console_script() is None, reason="the `adapt` console script is not installed")
def test_console_script_user_error_exit_code_and_no_traceback(tmp_path):
    missing = tmp_path / "nowhere"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([_console_script(), "sample", "--base", str(missing), "--prompt", "x", "--steps", "2",
                           "--out", str(tmp_path / "x.png")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and str(missing) in proc.stderr and "error:" in proc.stderr
    assert not (tmp_path / "x.png").exists()
