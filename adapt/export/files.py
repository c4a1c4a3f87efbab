"""Reading adapter files of any convention, matching them to a model, and verified writing.

`load_lora_file(path, pipe)` is the import entry point: it reads a .safetensors file
written by adapt, diffusers, kohya sd-scripts, LyCORIS, A1111 or ComfyUI tooling and
returns `(adapters keyed by module path, header metadata)`, already checked against
the pipeline's layers (names, shapes, model family).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from adapt.export.convention import (AdapterFileError, ModuleAdapter, ParsedFile, component_of, dora_weight,
                                     parse_state_dict, to_diffusers, to_kohya)

CROSS_ATTENTION_FAMILY = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 4096: "a T5-conditioned model"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Relative tolerance of the write-time check, per stored dtype (fp16 keeps 10-11 significant bits, bf16 7-8).
TOLERANCE = {"fp32": 1e-5, "fp16": 4e-3, "bf16": 3e-2}
_PEFT_PART = ("base_layer", "lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector", "lora_embedding_A",
              "lora_embedding_B")


def read_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a .safetensors file; a truncated or foreign file is a clear error."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such adapter file")
    if path.suffix in (".ckpt", ".pt", ".bin", ".pth"):
        raise AdapterFileError(f"{path}: pickled adapter files can run code when loaded; adapt reads .safetensors only")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        size = path.stat().st_size
        raise AdapterFileError(f"{path}: not a readable .safetensors file ({size} bytes) — it is truncated (an "
                               f"interrupted download or copy?) or not safetensors at all: {exc}") from None
    return tensors, meta


def parse_file(path: str | Path) -> ParsedFile:
    tensors, meta = read_file(path)
    return parse_state_dict(tensors, str(path), meta)


def model_layers(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{module path: weight shape} for every Linear/Conv layer, seen through any peft wrappers already injected."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, module in model.named_modules():
        if any(part in _PEFT_PART for part in name.split(".")):
            continue
        if isinstance(module, BaseTunerLayer):
            out[name] = tuple(module.get_base_layer().weight.shape)
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            out[name] = tuple(module.weight.shape)
    return out


def resolve(parsed: ParsedFile, layers: dict[str, dict[str, tuple[int, ...]]]) -> dict[str, ModuleAdapter]:
    """Match the file's layers to a model's: {component: {path: weight shape}} -> adapters keyed by `component.path`."""
    markers = parsed.family_markers()
    if markers:
        raise AdapterFileError(f"{parsed.source}: this adapter was made for SDXL (its keys contain {markers}); the "
                               "base model here is an SD 1.x/2.x-style model. Use a LoRA trained for this base.")
    dotted = {c: {alias: p for p in paths for alias in _aliases(c, p)} for c, paths in layers.items()}
    flat = {c: {alias.replace(".", "_"): p for alias, p in names.items()} for c, names in dotted.items()}
    out, unknown, mismatched = {}, [], []
    for name, ad in parsed.layers.items():
        component, inner, is_flat = component_of(name)
        path = (flat if is_flat else dotted).get(component, {}).get(inner)
        if path is None:
            unknown.append(name)
            continue
        shape = layers[component][path]
        if ad.out_in() != (shape[0], int(torch.Size(shape[1:]).numel())):
            mismatched.append((name, ad.out_in(), shape))
            continue
        out[f"{component}.{path}"] = ad
    if mismatched:
        raise AdapterFileError(_shape_message(parsed.source, mismatched, layers))
    if unknown:
        raise AdapterFileError(f"{parsed.source}: {len(unknown)} of {len(parsed.layers)} adapter layers match no layer "
                               f"of this model, e.g. {unknown[:3]}. The adapter was made for a different model "
                               "architecture (or a different family) than this base.")
    return out


def _aliases(component: str, path: str) -> tuple[str, ...]:
    """transformers 5 names CLIP's layers `encoder.layers...`, files (kohya, diffusers, transformers 4) `text_model.encoder...`."""
    if component == "text_encoder" and not path.startswith("text_model."):
        return path, "text_model." + path
    return (path,)


def _shape_message(source, mismatched, layers) -> str:
    name, (out_f, in_f), shape = mismatched[0]
    text = f"{source}: {len(mismatched)} adapter layer(s) do not fit this model's weights, e.g. '{name}' makes a " \
           f"{out_f}x{in_f} update for a {'x'.join(map(str, shape))} weight."
    for n, (o, i), s in mismatched:  # attn2.to_k reads the text embedding: its input width names the family
        if n.replace(".", "_").endswith("attn2_to_k") and i != s[1]:
            text += (f" Its cross-attention input width is {i} ({CROSS_ATTENTION_FAMILY.get(i, 'another family')}) but "
                     f"this base's is {s[1]} ({CROSS_ATTENTION_FAMILY.get(s[1], 'a custom model')}): the adapter "
                     "belongs to another model family.")
            break
    return text + " Use an adapter trained for this base."


def pipe_layers(pipe) -> dict[str, dict[str, tuple[int, ...]]]:
    return {c: model_layers(getattr(pipe, c)) for c in ("unet", "text_encoder") if getattr(pipe, c, None) is not None}


def load_lora_file(path: str | Path, pipe=None) -> tuple[dict[str, ModuleAdapter], dict[str, str]]:
    """Read an adapter file of any supported convention: ({`unet.<path>`: ModuleAdapter}, header metadata).

    With a pipeline the layers are matched against its modules (names, shapes, family) and kohya's flat
    names become module paths; without one, kohya names stay as written (they cannot be inverted alone).
    """
    parsed = parse_file(path)
    if pipe is None:
        return dict(parsed.layers), parsed.metadata
    return resolve(parsed, pipe_layers(pipe)), parsed.metadata


def diffusers_state_dict(adapters: dict[str, ModuleAdapter]) -> dict[str, torch.Tensor]:
    """A state dict `pipe.load_lora_weights` accepts (plain LoRA/DoRA only)."""
    return to_diffusers(adapters)


# ---- verified writing --------------------------------------------------------------------------------
def deltas(adapters: dict[str, ModuleAdapter], weights: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The weight change each adapter makes at scale 1 (DoRA: needs the base weights, else the direction part alone)."""
    out = {}
    for path, ad in adapters.items():
        if ad.magnitude is not None and weights is not None:
            out[path] = dora_weight(weights[path], ad) - weights[path].float()
        else:
            out[path] = ad.product() * ad.scale
    return out


def compare(expected: dict[str, ModuleAdapter], got: dict[str, ModuleAdapter]) -> float:
    """Largest relative error of the implied deltas (and DoRA magnitudes) between two adapter sets."""
    if set(expected) != set(got):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise AdapterFileError(f"layers differ after writing: missing {missing[:3]}, unexpected {extra[:3]}")
    worst = 0.0
    for path, a in expected.items():
        b = got[path]
        da, db = a.product() * a.scale, b.product() * b.scale
        worst = max(worst, float((da - db.reshape(da.shape)).abs().max() / da.abs().max().clamp_min(1e-12)))
        if (a.magnitude is None) != (b.magnitude is None):
            raise AdapterFileError(f"{path}: DoRA magnitude lost or invented by the export")
        if a.magnitude is not None:
            ma, mb = a.magnitude.float(), b.magnitude.float().reshape(-1)
            worst = max(worst, float((ma - mb).abs().max() / ma.abs().max().clamp_min(1e-12)))
    return worst


def metadata_json(meta: dict) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items() if v is not None}


def write_adapters(adapters: dict[str, ModuleAdapter], path: Path, fmt: str, dtype: str = "fp32",
                   metadata: Optional[dict] = None) -> float:
    """Write in `fmt` (diffusers | kohya | comfyui), re-read, compare; returns the max relative delta error.

    A file whose implied deltas differ from `adapters` beyond the dtype's tolerance is removed and an error raised.
    """
    from adapt.data.cache import atomic_save

    if dtype not in DTYPES:
        raise AdapterFileError(f"unknown dtype '{dtype}'; choose fp16, bf16 or fp32")
    state = to_diffusers(adapters) if fmt == "diffusers" else to_kohya(adapters)
    state = {k: (v.to(DTYPES[dtype]) if v.dim() else v.float()) for k, v in state.items()}
    path = Path(path)
    # Written and checked under a hidden name, renamed only when it is right: a bad export never replaces a good file.
    check = path.with_name(f".{path.name}.check")
    atomic_save(state, check, metadata=metadata_json(metadata or {}))
    paths = {c: {} for c in ("unet", "text_encoder")}
    for p, ad in adapters.items():  # the written names map back through the trained layers' own paths
        c, _, inner = p.partition(".")
        paths[c][inner] = (ad.out_in()[0], ad.out_in()[1])
    try:
        err = compare(adapters, resolve(parse_file(check), paths))
    except Exception:
        check.unlink(missing_ok=True)
        raise
    if err > TOLERANCE[dtype]:
        check.unlink(missing_ok=True)
        raise AdapterFileError(f"{path}: the written adapter implies weight changes that differ from the trained ones "
                               f"by {err:.2e} (relative; tolerance for {dtype} is {TOLERANCE[dtype]:.0e}); nothing written.")
    os.replace(check, path)
    return err
