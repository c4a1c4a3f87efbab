"""Adapters that load everywhere: export -> import round trips per type x format, plain diffusers, hand-made
kohya/LyCORIS files, merging, bad input.  One short training run per adapter type is shared by the module."""
import json
import os

import numpy as np
import pytest
import torch

from adapt.export.command import export, merge
from adapt.export.convention import AdapterFileError
from adapt.export.files import deltas, load_lora_file, model_layers
from adapt.infer import attach, generate

TYPES = {"lora": {"type": "lora", "train_text_encoder": True}, "dora": {"type": "lora", "use_dora": True},
         "loha": {"type": "loha"}, "lokr": {"type": "lokr"}}
FORMATS = ("diffusers", "kohya", "comfyui")
PIXEL_TOL = {"fp32": 1, "fp16": 2}  # uint8 levels; the fp32 paths differ only in float summation order
DELTA_TOL = {"fp32": 1e-5, "fp16": 4e-3}
MEASURED = {}
# The tests below share 4 short training runs (~40 s of CPU on an idle 2-core machine, several minutes when it is
# shared); the hand-made-file and bad-input tests need none and stay in the quick set.
SLOW = pytest.mark.slow  # (type, format, dtype) -> max relative delta error; printed at the end of the module (-s)


@pytest.fixture(scope="module")
def runs(tiny_base_dir, tmp_path_factory):
    """Each adapter type trained for 2 steps on the image-folder fixture (cached latents and text embeddings)."""
    from adapt.config import load_config
    from adapt.testing import make_image_folder
    from adapt.train.trainer import train

    root = tmp_path_factory.mktemp("export_runs")
    photos = make_image_folder(root / "photos")
    out = {}
    for name, extra in TYPES.items():
        raw = {"recipe": "lora", "base": {"path": str(tiny_base_dir)},
               "data": {"dataset": str(photos), "resolution": 32, "cache_dir": str(root / "cache")},
               "train": {"steps": 2, "batch_size": 2, "lr": 5e-2, "checkpoint_every": 100},
               "preview": {"prompts": []}, "output_dir": str(root / name), "lora": {"rank": 4, **extra}}
        cfg = load_config(None, [], raw=raw)
        out[name] = (train(cfg, runs_root=root / "runs"), cfg)
    return out


def _pipe(base_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, **extra):
    return np.asarray(generate(pipe, ["a red square"], [7], steps=3, **extra)[0]).astype(int)


@pytest.fixture(scope="module")
def trained(runs, tiny_base_dir):
    """The live trained models rebuilt from each run's last checkpoint (independent of any export code):
    {type: (image at scale 1, {module path: weight change}, {module path: base weight})}."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from adapt.base import BaseModel
    from adapt.recipes.lora import LoRA
    from adapt.train import checkpoint as ckpt

    out = {}
    for name, (run_dir, cfg) in runs.items():
        base = BaseModel.load(str(tiny_base_dir))
        recipe = LoRA(cfg)
        recipe.prepare(base)
        recipe.load_trainable_state_dict(base, ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))[0])
        pipe = base.pipeline()
        pipe.set_progress_bar_config(disable=True)
        image = _image(pipe)
        changes, weights = {}, {}
        for component in ("unet", "text_encoder"):
            for path, layer in getattr(base, component).named_modules():
                if isinstance(layer, BaseTunerLayer) and "default" in layer.scaling:
                    w0 = layer.get_base_layer().weight.detach().clone()
                    layer.merge(adapter_names=["default"])
                    changes[f"{component}.{path}"] = layer.get_base_layer().weight.detach() - w0
                    weights[f"{component}.{path}"] = w0
                    layer.unmerge()
        out[name] = (image, changes, weights)
    return out


def _max_rel(expected: dict, got: dict) -> float:
    assert set(expected) == set(got)
    return max(float((expected[k] - got[k].reshape(expected[k].shape)).abs().max() / expected[k].abs().max()) for k in expected)


@pytest.mark.parametrize("kind", list(TYPES))
@SLOW
def test_round_trip_every_format(kind, runs, trained, tiny_base_dir, tmp_path):
    run_dir, _ = runs[kind]
    image, changes, weights = trained[kind]
    assert any(float(c.abs().max()) > 0 for c in changes.values()), "training changed nothing"
    reader = _pipe(tiny_base_dir)
    for fmt in FORMATS:
        for dtype in ("fp32", "fp16"):
            path, write_err = export(run_dir, fmt, dtype=dtype, out=tmp_path / f"{kind}-{fmt}-{dtype}.safetensors")
            adapters, meta = load_lora_file(path, reader)
            err = _max_rel(changes, deltas(adapters, weights))
            MEASURED[(kind, fmt, dtype)] = err
            assert err <= DELTA_TOL[dtype], (kind, fmt, dtype, err)
            assert write_err <= DELTA_TOL[dtype]
            assert meta["ss_network_dim"] == "4" and meta["ss_resolution"] == "(32, 32)" and meta["ss_steps"] == "2"
            if dtype == "fp16" and (fmt != "comfyui" or kind == "lora"):  # comfyui = kohya tensors
                got = _image(attach(_pipe(tiny_base_dir), path, scale=1.0))
                assert np.abs(got - image).max() <= PIXEL_TOL[dtype], (kind, fmt, dtype)
    # the run directory itself (what `adapt sample --adapter RUN` uses) gives the trained model's image too
    assert np.abs(_image(attach(_pipe(tiny_base_dir), run_dir, scale=1.0)) - image).max() <= 1


@SLOW
def test_kohya_names_and_header(runs, tmp_path):
    from safetensors import safe_open

    path, _ = export(runs["lora"][0], "kohya", dtype="fp16", out=tmp_path / "k.safetensors")
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight").dtype == torch.float16
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in keys
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v.alpha" in keys
    assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight" in keys
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_alpha"] == "4"
    assert meta["ss_base_model_version"] == "custom" and meta["ss_sd_model_name"]
    dora, _ = export(runs["dora"][0], "kohya", out=tmp_path / "d.safetensors")
    with safe_open(str(dora), "pt") as f:
        scale = [k for k in f.keys() if k.endswith(".dora_scale")]
        assert scale and f.get_tensor(scale[0]).shape[1:] == (1,)
    loha, _ = export(runs["loha"][0], "comfyui", out=tmp_path / "h.safetensors")
    with safe_open(str(loha), "pt") as f:
        assert any(k.endswith(".hada_w2_b") for k in f.keys()) and json.loads(f.metadata()["ss_network_args"])["algo"] == "loha"


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@SLOW
def test_plain_diffusers_loads_lora_exports(fmt, runs, trained, tiny_base_dir, tmp_path):
    path, _ = export(runs["lora"][0], fmt, dtype="fp32", out=tmp_path / f"lora-{fmt}.safetensors")
    pipe = _pipe(tiny_base_dir)
    pipe.load_lora_weights(str(path))  # plain diffusers, no adapt code involved in loading
    assert set(pipe.text_encoder.peft_config) and set(pipe.unet.peft_config)
    assert np.abs(_image(pipe) - trained["lora"][0]).max() <= 1


@SLOW
def test_what_plain_diffusers_does_with_dora_loha_lokr(runs, trained, tiny_base_dir, tmp_path):
    """diffusers reads DoRA in its own format; it drops kohya's dora_scale (plain LoRA remains); LoHa/LoKr: refused."""
    path, _ = export(runs["dora"][0], "diffusers", dtype="fp32", out=tmp_path / "dora-d.safetensors")
    pipe = _pipe(tiny_base_dir)
    pipe.load_lora_weights(str(path))
    assert np.abs(_image(pipe) - trained["dora"][0]).max() <= 1
    path, _ = export(runs["dora"][0], "kohya", dtype="fp32", out=tmp_path / "dora-k.safetensors")
    pipe = _pipe(tiny_base_dir)
    pipe.load_lora_weights(str(path))
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert not layer.use_dora[next(iter(pipe.unet.peft_config))]  # the magnitude was dropped by diffusers
    for kind in ("loha", "lokr"):
        for fmt in ("diffusers", "kohya"):
            path, _ = export(runs[kind][0], fmt, out=tmp_path / f"{kind}-{fmt}.safetensors")
            with pytest.raises(ValueError):
                _pipe(tiny_base_dir).load_lora_weights(str(path))


# ---- files made by other tools, written here by hand from the published conventions -------------------
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TE_Q = "encoder.layers.0.self_attn.q_proj"


def _fused_change(base_dir, path, scale):
    pipe = _pipe(base_dir)
    before = {k: v.clone() for k, v in _weights(pipe).items()}
    attach(pipe, path, scale=scale)
    from adapt.export.apply import fuse

    fuse(pipe)
    after = _weights(pipe)
    return {k: after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}


def _weights(pipe):
    return {f"{c}.{n}": p.detach() for c in ("unet", "text_encoder") for n, p in getattr(pipe, c).named_parameters()}


def test_handmade_kohya_lora_applies_expected_delta(tiny_base_dir, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    te_down, te_up = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    unet_name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    te_name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    path = tmp_path / "someone_elses_lora.safetensors"
    save_file({f"{unet_name}.lora_down.weight": down.half(), f"{unet_name}.lora_up.weight": up.half(),
               f"{unet_name}.alpha": torch.tensor(1.0), f"{te_name}.lora_down.weight": te_down,
               f"{te_name}.lora_up.weight": te_up, f"{te_name}.alpha": torch.tensor(4.0)}, str(path),
              metadata={"ss_network_dim": "2"})
    adapters, meta = load_lora_file(path, _pipe(tiny_base_dir))
    assert meta["ss_network_dim"] == "2" and set(adapters) == {f"unet.{Q}", f"text_encoder.{TE_Q}"}
    changes = _fused_change(tiny_base_dir, path, scale=0.5)
    expected_unet = 0.5 * (1.0 / 2) * up.half().float() @ down.half().float()
    expected_te = 0.5 * (4.0 / 2) * te_up @ te_down
    assert set(changes) == {f"unet.{Q}.weight", f"text_encoder.{TE_Q}.weight"}
    assert torch.allclose(changes[f"unet.{Q}.weight"], expected_unet, atol=1e-5)
    assert torch.allclose(changes[f"text_encoder.{TE_Q}.weight"], expected_te, atol=1e-5)


def test_handmade_lycoris_loha_and_lokr(tiny_base_dir, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = (f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_{x}" for x in ("to_q", "to_k", "to_v"))
    loha = {f"{q}.hada_w1_a": r(32, 2), f"{q}.hada_w1_b": r(2, 32), f"{q}.hada_w2_a": r(32, 2), f"{q}.hada_w2_b": r(2, 32),
            f"{q}.alpha": torch.tensor(1.0)}
    # LoKr: w2 decomposed (alpha/rank applies) on to_k; both factors full (alpha ignored, as A1111/ComfyUI do) on to_v
    lokr = {f"{k}.lokr_w1": r(4, 4), f"{k}.lokr_w2_a": r(8, 2), f"{k}.lokr_w2_b": r(2, 8), f"{k}.alpha": torch.tensor(1.0),
            f"{v}.lokr_w1": r(2, 4), f"{v}.lokr_w2": r(16, 8), f"{v}.alpha": torch.tensor(3.0)}
    path = tmp_path / "lycoris.safetensors"
    save_file({**loha, **lokr}, str(path))
    changes = _fused_change(tiny_base_dir, path, scale=1.0)
    exp_q = 0.5 * (loha[f"{q}.hada_w1_a"] @ loha[f"{q}.hada_w1_b"]) * (loha[f"{q}.hada_w2_a"] @ loha[f"{q}.hada_w2_b"])
    exp_k = 0.5 * torch.kron(lokr[f"{k}.lokr_w1"], lokr[f"{k}.lokr_w2_a"] @ lokr[f"{k}.lokr_w2_b"])
    exp_v = torch.kron(lokr[f"{v}.lokr_w1"], lokr[f"{v}.lokr_w2"])
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1."
    for name, exp in (("to_q", exp_q), ("to_k", exp_k), ("to_v", exp_v)):
        assert torch.allclose(changes[prefix + name + ".weight"], exp, atol=1e-5), name


# ---- merging -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "loha"])
@SLOW
def test_merge_matches_base_plus_adapter(kind, runs, tiny_base_dir, tmp_path):
    run_dir, _ = runs[kind]
    out = merge(run_dir, tmp_path / "merged", scale=0.7, single_file=kind == "lora")
    merged = _image(_pipe(out))
    live = _image(attach(_pipe(tiny_base_dir), run_dir, scale=0.7))
    assert np.abs(merged - live).max() <= 2
    assert np.abs(merged - _image(_pipe(tiny_base_dir))).max() > 0  # the merge changed the model
    assert not any("lora" in k or "hada" in k for k in _weights(_pipe(out)))
    if kind == "lora":
        assert (out / "merged.safetensors").stat().st_size > 0
    with pytest.raises(Exception, match="not empty"):
        merge(run_dir, out, scale=0.7)


# ---- bad input ---------------------------------------------------------------------------------------
def test_sdxl_lora_into_sd1_base_is_refused(tiny_base_dir, tmp_path):
    from safetensors.torch import save_file

    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    path = tmp_path / "sdxl_lora.safetensors"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 2048), f"{name}.lora_up.weight": torch.zeros(640, 4),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)}, str(path))
    with pytest.raises(AdapterFileError, match="SDXL"):
        attach(_pipe(tiny_base_dir), path)


def test_other_family_by_cross_attention_width(tiny_base_dir, tmp_path):
    from safetensors.torch import save_file

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    path = tmp_path / "sd2_lora.safetensors"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 1024), f"{name}.lora_up.weight": torch.zeros(32, 4)}, str(path))
    with pytest.raises(AdapterFileError, match=r"1024 \(SD 2.x\).*another model family"):
        load_lora_file(path, _pipe(tiny_base_dir))


def test_unknown_keys_and_layers(tiny_base_dir, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "not_a_lora.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(AdapterFileError, match="not LoRA/LoHa/LoKr tensors"):
        load_lora_file(path)
    path = tmp_path / "wrong_layers.safetensors"
    save_file({"lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_no_such_block_to_q.lora_up.weight": torch.zeros(32, 2)}, str(path))
    with pytest.raises(AdapterFileError, match="match no layer"):
        attach(_pipe(tiny_base_dir), path)


@SLOW
def test_truncated_file(runs, tmp_path):
    good, _ = export(runs["lora"][0], "kohya", out=tmp_path / "good.safetensors")
    data = good.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="truncated"):
        load_lora_file(bad)
    with pytest.raises(AdapterFileError, match="truncated"):
        export(bad, "kohya", base=str(runs["lora"][1].base.path), out=tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists() and good.read_bytes() == data


@SLOW
def test_failed_check_keeps_previous_file(runs, tmp_path, monkeypatch):
    import adapt.export.files as files

    good, _ = export(runs["lora"][0], "kohya", out=tmp_path / "a.safetensors")
    before = good.read_bytes()
    real = files.to_kohya

    def corrupt(adapters):
        state = real(adapters)
        key = next(k for k in state if k.endswith("lora_up.weight"))
        state[key] = state[key] * 1.5
        return state

    monkeypatch.setattr(files, "to_kohya", corrupt)
    with pytest.raises(AdapterFileError, match="differ from the trained ones"):
        export(runs["lora"][0], "kohya", out=good)
    assert good.read_bytes() == before and not list(tmp_path.glob(".*check*"))


@SLOW
def test_cli_export_and_config_checks(runs, tmp_path, capsys):
    from adapt.cli import main
    from adapt.config import load_config
    from adapt.errors import ConfigError

    out = tmp_path / "cli.safetensors"
    assert main(["export", str(runs["lokr"][0]), "--format", "comfyui", "--dtype", "bf16", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    raw = {"recipe": "lora", "lora": {"type": "loha", "use_dora": True}}
    with pytest.raises(ConfigError, match="use_dora"):
        load_config(None, [], raw=raw)


def teardown_module(module):
    if MEASURED and os.environ.get("ADAPT_EXPORT_REPORT"):
        with open(os.environ["ADAPT_EXPORT_REPORT"], "w") as f:
            json.dump({" x ".join(k): v for k, v in sorted(MEASURED.items())}, f, indent=1)


def test_only_the_empty_text_encoder_note_is_silenced():
    import logging

    from adapt.export.apply import quiet_empty_text_encoder_note

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("diffusers.loaders.lora_base")
    logger.addHandler(handler)
    try:
        quiet_empty_text_encoder_note()
        quiet_empty_text_encoder_note()  # idempotent
        logger.warning("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'.")
        logger.warning("Loading adapter weights from state_dict led to unexpected keys")
    finally:
        logger.removeHandler(handler)
    assert seen == ["Loading adapter weights from state_dict led to unexpected keys"]
    assert sum(type(f).__name__ == "_NoEmptyTextEncoderNote" for f in logger.filters) == 1
