"""`adapt world build-base`: a shortened build runs end to end, and the embedded base loads and generates."""
from pathlib import Path

import numpy as np
import pytest
import torch

from adapt.world import commands

TINYWORLD = Path(commands.ASSETS) / "tinyworld"


def _load(path, **kw):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompt="a small red circle on a blue background, at the left", steps=2):
    return pipe(prompt, num_inference_steps=steps, guidance_scale=3.0, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_quick_build_base_end_to_end(tmp_path):
    torch.set_num_threads(1)
    parser = __import__("argparse").ArgumentParser()
    commands.add_arguments(parser)
    out = tmp_path / "base"
    assert commands.run(parser.parse_args(["build-base", "--quick", "--out", str(out)])) == 0
    assert (out / "model_index.json").is_file() and (out / "build_info.json").is_file()
    pipe = _load(out)
    sched = pipe.scheduler.config
    assert sched.prediction_type == "v_prediction" and sched.rescale_betas_zero_snr and sched.timestep_spacing == "trailing"
    assert pipe.vae.config.scaling_factor != 0.18215  # measured, not SD's constant
    assert pipe.safety_checker is None
    image = _generate(pipe)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


@pytest.mark.skipif(not (TINYWORLD / "model_index.json").is_file(), reason="embedded base not built yet")
def test_embedded_base_loads_in_fp32_and_generates():
    torch.set_num_threads(1)
    pipe = _load(TINYWORLD, torch_dtype=torch.float32)
    assert all(p.dtype == torch.float32 for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    ids = pipe.tokenizer("a large blue star at the top").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and len(ids) < pipe.tokenizer.model_max_length
    a = _generate(pipe)
    assert a.shape == (64, 64, 3)
    # The weights are stored in fp16; loading without a dtype gives the same fp32 model.
    b = _generate(_load(TINYWORLD))
    np.testing.assert_allclose(a, b, atol=1e-5)
    total = sum(f.stat().st_size for f in TINYWORLD.rglob("*") if f.is_file())
    assert total < 20 * 2**20
