"""`adapt export`: write a run's adapter in another tool's key convention, or merge it into the base.

Formats:
  diffusers  `unet.<module path>.lora_A/lora_B` (+ `lora_magnitude_vector` for DoRA), scale baked into lora_B:
             `pipe.load_lora_weights(file)` in plain diffusers.  LoHa/LoKr keep peft's tensor names here
             (diffusers' SD loader cannot read those; adapt and peft can).
  kohya      kohya sd-scripts / A1111 / Forge / LyCORIS: `lora_unet_...`/`lora_te_...` with lora_down/lora_up/alpha,
             dora_scale, hada_* or lokr_*; diffusers' `load_lora_weights` also reads it for plain LoRA.
  comfyui    the same tensors as kohya.  ComfyUI's LoRA loader maps `lora_unet_`/`lora_te_` names for every
             layer of SD1/SD2 models and for every adapter type it supports (LoRA, LoCon, DoRA, LoHa, LoKr),
             while its diffusers-name map expects the older `...processor.to_q` attention-processor spelling
             and ignores the header alpha; the kohya names are what it reads most reliably.

Every file is re-read after writing and its implied weight changes compared with the trained ones.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from adapt.errors import ConfigError, ModelLoadError
from adapt.export.convention import ModuleAdapter
from adapt.export.files import parse_file, pipe_layers, resolve, write_adapters
from adapt.export.meta import training_metadata

FORMATS = ("diffusers", "kohya", "comfyui")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a run directory printed by `adapt train` (or an adapter .safetensors file)")
    p.add_argument("--format", choices=FORMATS, default="kohya", help="key convention of the written file (default kohya)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="tensor dtype in the file (default fp16)")
    p.add_argument("--out", help="output file (default: RUN_DIR/<run name>-<format>.safetensors); with --merge, a folder")
    p.add_argument("--merge", action="store_true", help="fuse the adapter into the base and write a full diffusers folder")
    p.add_argument("--scale", type=float, default=1.0, help="adapter weight used by --merge (default 1.0)")
    p.add_argument("--single-file", action="store_true", help="with --merge, also write an A1111-style single .safetensors")
    p.add_argument("--base", help="base model (default: the one the run was trained on)")


def run(args: argparse.Namespace) -> int:
    if args.merge:
        if not args.out:
            raise ConfigError("--merge needs --out DIR (the folder to write the merged diffusers model to)")
        out = merge(args.source, args.out, scale=args.scale, base=args.base, single_file=args.single_file)
    else:
        out, err = export(args.source, args.format, dtype=args.dtype, out=args.out, base=args.base)
        print(f"checked: implied weight changes match the trained ones (max relative error {err:.1e})")
    print(out)
    return 0


# ---- the adapter of a run ----------------------------------------------------------------------------
def adapter_file(source: Path) -> Path:
    from adapt.recipes.lora import LYCORIS_NAME, WEIGHT_NAME

    if source.is_file():
        return source
    for name in (WEIGHT_NAME, LYCORIS_NAME):
        if (source / name).is_file():
            return source / name
    raise ModelLoadError(f"{source}: no adapter file in this run directory (expected {WEIGHT_NAME} or {LYCORIS_NAME}); "
                         "only LoRA-family runs can be exported.")


def run_meta(source: Path) -> dict:
    from adapt.infer import RUN_META

    return json.loads((source / RUN_META).read_text()) if (source / RUN_META).is_file() else {}


def base_layers(base: str) -> dict[str, dict]:
    """The base's layer names and shapes, from its configs alone (modules built on the meta device, no weights read)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(base)
    if not (root / "unet" / "config.json").is_file():
        raise ModelLoadError(f"{base}: cannot read the base model's configs to name the adapter's layers; pass --base "
                             "with a local diffusers folder of the model the adapter was trained on.")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))

    class _P:  # pipe_layers only needs the two attributes
        pass

    holder = _P()
    holder.unet, holder.text_encoder = unet, text_encoder
    return pipe_layers(holder)


def load_run_adapters(source: str | Path, base: Optional[str] = None) -> tuple[dict[str, ModuleAdapter], dict, Path]:
    source = Path(source)
    if not source.exists():
        raise ModelLoadError(f"{source}: no such run directory or adapter file")
    meta = run_meta(source) if source.is_dir() else {}
    path = adapter_file(source)
    parsed = parse_file(path)
    base = base or meta.get("base_model") or parsed.metadata.get("base_model") or parsed.metadata.get("ss_sd_model_name")
    if not base:
        raise ModelLoadError(f"{path}: which base model is this adapter for? Pass --base DIR.")
    return resolve(parsed, base_layers(base)), {**parsed.metadata, **meta, "base_model": base}, path


def export(source: str | Path, fmt: str, dtype: str = "fp16", out: Optional[str | Path] = None,
           base: Optional[str] = None) -> tuple[Path, float]:
    """Write `source`'s adapter as one .safetensors in `fmt`; returns (path, max relative delta error of the check)."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    adapters, meta, path = load_run_adapters(source, base)
    source = Path(source)
    stem = source.name if source.is_dir() else path.stem
    out = Path(out) if out else (source if source.is_dir() else path.parent) / f"{stem}-{fmt}.safetensors"
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: adapter files are written as .safetensors; give a name ending in .safetensors")
    header = {**training_metadata(meta, adapters), "ss_output_name": out.stem, "format": "pt",
              **{k: str(v) for k, v in meta.items() if k.startswith("adapt.")},
              "adapt.export_format": fmt, "adapt.export_dtype": dtype}
    err = write_adapters(adapters, out, "diffusers" if fmt == "diffusers" else "kohya", dtype=dtype, metadata=header)
    return out, err


# ---- merging -----------------------------------------------------------------------------------------
def merge(source: str | Path, out: str | Path, scale: float = 1.0, base: Optional[str] = None,
          single_file: bool = False):
    """Fuse the adapter at `scale` into the base; write a full diffusers folder (and optionally a single file)."""
    from diffusers import StableDiffusionPipeline

    from adapt.export.apply import fuse
    from adapt.recipes.lora import LoRA

    source, out = Path(source), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new folder (nothing was overwritten)")
    meta = run_meta(source) if source.is_dir() else {}
    base = base or meta.get("base_model")
    if not base:
        raise ModelLoadError(f"{source}: which base model should the adapter be merged into? Pass --base DIR.")
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    if source.is_dir() and meta.get("recipe") not in (None, "lora"):
        raise ConfigError(f"{source}: merging is for LoRA-family adapters; this run's recipe is '{meta.get('recipe')}'")
    LoRA.apply(pipe, source, scale=scale)
    fuse(pipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:  # write beside the target, then rename: a half-written model folder never appears under `out`
        pipe.save_pretrained(tmp, safe_serialization=True)
        if single_file:
            from adapt.export.ldm import save_single_file

            save_single_file(pipe, tmp / f"{out.name}.safetensors")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
