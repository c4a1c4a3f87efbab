"""Adapter key conventions: parse any of them into one in-memory form, and write each of them.

The in-memory form is a dict `module path -> ModuleAdapter`, where the module path is the
diffusers/transformers module name with the component in front, e.g.
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` or
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj`.

Conventions read and written (written by us from the published conventions):
  kohya / A1111 / LyCORIS: `lora_unet_<path with . -> _>` and `lora_te_<path>`, tensors
      `.lora_down.weight` (r, in), `.lora_up.weight` (out, r), `.alpha` (scale = alpha / r),
      DoRA `.dora_scale` (out, 1); LoHa `.hada_w1_a/.hada_w1_b/.hada_w2_a/.hada_w2_b`
      (Hyeon-Woo et al. 2022: dW = (w1a w1b) * (w2a w2b) elementwise, scale = alpha / r);
      LoKr `.lokr_w1` or `.lokr_w1_a/_b`, `.lokr_w2` or `.lokr_w2_a/_b` (Yeh et al. 2023:
      dW = kron(w1, w2); scale = alpha / r only when a factor is rank-decomposed, else 1).
  diffusers / PEFT: `unet.<path>.lora_A.weight` (r, in), `.lora_B.weight` (out, r),
      `.lora_magnitude_vector` (out,), peft LoHa/LoKr parameter names unchanged; older
      diffusers `...attn1.processor.to_q_lora.down.weight` names are read too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from adapt.errors import ModelLoadError

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# Prefixes that mean another model family (SDXL has two text encoders and an LDM-named UNet in kohya files).
SDXL_MARKERS = ("lora_te1_", "lora_te2_", "text_encoder_2.", "_input_blocks_", "_output_blocks_", "_middle_block_",
                "conditioner.embedders")
LORA_SUFFIXES = {  # file suffix -> our tensor name
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up", "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up", "dora_scale": "magnitude", "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude", "alpha": "alpha",
}
LOHA_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
UNSUPPORTED = {"hada_t1": "LoHa with CP/Tucker decomposition", "hada_t2": "LoHa with CP/Tucker decomposition",
               "lokr_t2": "LoKr with CP/Tucker decomposition", "lora_mid.weight": "LoCon with a Tucker middle tensor",
               "diff": "full weight differences", "diff_b": "bias differences", "w_norm": "norm-layer weights",
               "b_norm": "norm-layer weights", "on_input": "IA3"}
_SUFFIX_RE = re.compile(r"^(?P<module>.+?)\.(?P<suffix>" + "|".join(
    re.escape(s) for s in sorted([*LORA_SUFFIXES, *LOHA_NAMES, *LOKR_NAMES, *UNSUPPORTED], key=len, reverse=True)) + r")$")


class AdapterFileError(ModelLoadError):
    """An adapter file cannot be read or does not fit the model it is applied to."""


@dataclass
class ModuleAdapter:
    """One adapted layer: its factors and the multiplier applied to their product (alpha/rank resolved)."""

    kind: str                                   # "lora" | "loha" | "lokr"
    tensors: dict[str, torch.Tensor]            # lora: down, up; loha: hada_*; lokr: lokr_*
    scale: float = 1.0
    magnitude: Optional[torch.Tensor] = None    # DoRA (Liu et al. 2024) magnitude m, shape (out,)

    @property
    def rank(self) -> Optional[int]:
        t = self.tensors
        if self.kind == "lora":
            return int(t["down"].shape[0])
        if self.kind == "loha":
            return int(t["hada_w1_b"].shape[0])
        for k in ("lokr_w2_b", "lokr_w1_b"):  # LyCORIS: the decomposed factor's inner size is the rank
            if k in t:
                return int(t[k].shape[0])
        return None

    def product(self) -> torch.Tensor:
        """The factor product without the scale, flattened to 2-D (out, in * kernel) except for LoKr conv."""
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.kind == "lora":
            return t["up"].flatten(1) @ t["down"].flatten(1)
        if self.kind == "loha":
            return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2)

    def delta(self, weight_shape) -> torch.Tensor:
        """dW in the layer's weight shape (fp32).  DoRA's re-normalisation needs the base weight: see `dora_weight`."""
        return (self.product() * self.scale).reshape(weight_shape)

    def out_in(self) -> tuple[int, int]:
        """(out features, in features * kernel) this adapter produces: used to check it fits a layer."""
        p = self.product()
        return int(p.shape[0]), int(p[0].numel())

    def baked(self) -> dict[str, torch.Tensor]:
        """Factors with the scale multiplied into one of them (so that scale == 1)."""
        t = dict(self.tensors)
        key = {"lora": "up", "loha": "hada_w1_a"}.get(self.kind) or ("lokr_w1" if "lokr_w1" in t else "lokr_w1_a")
        t[key] = t[key].float() * self.scale
        return t


def dora_weight(weight: torch.Tensor, adapter: ModuleAdapter, strength: float = 1.0) -> torch.Tensor:
    """DoRA (Liu et al. 2024, eq. 5): W' = m * (W + s dW) / ||W + s dW||, the norm taken per output row (as peft does)."""
    w = weight.float() + strength * adapter.delta(weight.shape)
    norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    return adapter.magnitude.float().reshape(norm.shape) * w / norm


def flat_name(path: str) -> str:
    """kohya's module name: component prefix + module path with dots turned into underscores."""
    component, _, rest = path.partition(".")
    if component not in KOHYA_PREFIX:
        raise AdapterFileError(f"cannot write '{path}' in the kohya convention: only unet and text_encoder layers have names there")
    if component == "text_encoder" and not rest.startswith("text_model."):
        rest = "text_model." + rest  # kohya/A1111/ComfyUI name CLIP's layers as transformers 4 did
    return KOHYA_PREFIX[component] + rest.replace(".", "_")


# ---- reading ------------------------------------------------------------------------------------------
def group_keys(state: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Split `module.suffix` keys into {module name as written in the file: {suffix: tensor}}; unknown keys are an error."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        m = _SUFFIX_RE.match(key)
        if not m:
            unknown.append(key)
            continue
        groups.setdefault(m["module"], {})[m["suffix"]] = tensor
    if unknown:
        raise AdapterFileError(f"{source}: {len(unknown)} key(s) are not LoRA/LoHa/LoKr tensors in any convention adapt "
                               f"reads (kohya/A1111/LyCORIS, diffusers/PEFT), e.g. {unknown[:3]}. Is this a full model "
                               "checkpoint or an embedding rather than an adapter?")
    for module, parts in groups.items():
        bad = [UNSUPPORTED[s] for s in parts if s in UNSUPPORTED]
        if bad:
            raise AdapterFileError(f"{source}: layer '{module}' uses {bad[0]}, which adapt cannot load yet; "
                                   "plain LoRA/LoCon, DoRA, LoHa and LoKr are supported.")
    return groups


def module_adapter(parts: dict[str, torch.Tensor], name: str, source: str) -> ModuleAdapter:
    """Build one ModuleAdapter from its file tensors, resolving alpha the way A1111/ComfyUI/LyCORIS do."""
    alpha = parts.get("alpha")
    alpha = float(alpha.float().reshape(-1)[0]) if alpha is not None else None
    if any(k in parts for k in LOHA_NAMES):
        missing = [k for k in LOHA_NAMES if k not in parts]
        if missing:
            raise AdapterFileError(f"{source}: LoHa layer '{name}' lacks {missing}")
        ad = ModuleAdapter("loha", {k: parts[k] for k in LOHA_NAMES})
    elif any(k in parts for k in LOKR_NAMES):
        t = {k: parts[k] for k in LOKR_NAMES if k in parts}
        ok1 = "lokr_w1" in t or {"lokr_w1_a", "lokr_w1_b"} <= set(t)
        ok2 = "lokr_w2" in t or {"lokr_w2_a", "lokr_w2_b"} <= set(t)
        if not (ok1 and ok2):
            raise AdapterFileError(f"{source}: LoKr layer '{name}' has an incomplete factor ({sorted(t)})")
        ad = ModuleAdapter("lokr", t)
    else:
        if "down" not in _lora(parts) or "up" not in _lora(parts):
            raise AdapterFileError(f"{source}: layer '{name}' has no down/up (lora_A/lora_B) pair ({sorted(parts)})")
        lp = _lora(parts)
        ad = ModuleAdapter("lora", {"down": lp["down"], "up": lp["up"]})
        if "magnitude" in lp:
            ad.magnitude = _magnitude(lp["magnitude"], int(lp["up"].shape[0]), name, source)
    rank = ad.rank
    ad.scale = alpha / rank if (alpha is not None and rank) else 1.0
    return ad


def _lora(parts):
    return {LORA_SUFFIXES[k]: v for k, v in parts.items() if k in LORA_SUFFIXES}


def _magnitude(m: torch.Tensor, out_features: int, name: str, source: str) -> torch.Tensor:
    if m.shape[0] == out_features and m.numel() == out_features:
        return m.reshape(-1)
    raise AdapterFileError(f"{source}: DoRA layer '{name}' stores its magnitude over the input axis (shape "
                           f"{tuple(m.shape)}); adapt (like peft) supports the output-axis form only.")


def component_of(name: str) -> tuple[str, str, bool]:
    """(component, name inside it, is_flat_kohya_name) for a module name as written in a file."""
    for component, prefix in KOHYA_PREFIX.items():
        if name.startswith(prefix):
            return component, name[len(prefix):], True
    if name.startswith("lycoris_"):  # SimpleTuner's LyCORIS naming of diffusers UNets
        return "unet", name[len("lycoris_"):], True
    name = name.removeprefix("base_model.model.")
    for component in ("unet", "text_encoder"):
        if name.startswith(component + "."):
            return component, _old_diffusers(name[len(component) + 1:]), False
    if name.startswith("text_model."):
        return "text_encoder", name, False
    return "unet", _old_diffusers(name), False


def _old_diffusers(path: str) -> str:
    """`attn1.processor.to_q_lora` (diffusers attention-processor LoRA) -> `attn1.to_q`."""
    path = path.replace(".processor.", ".")
    path = re.sub(r"\.(to_q|to_k|to_v)_lora$", r".\1", path)
    return re.sub(r"\.to_out_lora$", ".to_out.0", path)


@dataclass
class ParsedFile:
    """A file's layers keyed by their names in the file, before they are matched to a model's modules."""

    layers: dict[str, ModuleAdapter]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "<state dict>"

    def family_markers(self) -> list[str]:
        return sorted({m for name in self.layers for m in SDXL_MARKERS if m in name})


def parse_state_dict(state: dict[str, torch.Tensor], source: str = "<state dict>", metadata=None) -> ParsedFile:
    if not state:
        raise AdapterFileError(f"{source}: the file holds no tensors")
    groups = group_keys(state, source)
    layers = {name: module_adapter(parts, name, source) for name, parts in groups.items()}
    return ParsedFile(layers, dict(metadata or {}), source)


# ---- writing ------------------------------------------------------------------------------------------
def to_kohya(adapters: dict[str, ModuleAdapter]) -> dict[str, torch.Tensor]:
    """The kohya/A1111/LyCORIS convention (also what ComfyUI maps most completely, see command.py)."""
    out: dict[str, torch.Tensor] = {}
    for path, ad in adapters.items():
        name = flat_name(path)
        if ad.kind == "lora":
            out[f"{name}.lora_down.weight"] = ad.tensors["down"]
            out[f"{name}.lora_up.weight"] = ad.tensors["up"]
            out[f"{name}.alpha"] = torch.tensor(float(ad.scale * ad.rank))
            if ad.magnitude is not None:  # LyCORIS/ComfyUI DoRA: (out, 1) on the output axis
                out[f"{name}.dora_scale"] = ad.magnitude.reshape(-1, *[1] * (ad.tensors["up"].dim() - 1))
        elif ad.kind == "loha":
            out.update({f"{name}.{k}": v for k, v in ad.tensors.items()})
            out[f"{name}.alpha"] = torch.tensor(float(ad.scale * ad.rank))
        else:
            # Readers apply alpha/rank only when a factor is decomposed; with two full factors the scale is baked in.
            rank = ad.rank
            tensors = ad.tensors if rank else ad.baked()
            out.update({f"{name}.{k}": v for k, v in tensors.items()})
            if rank:
                out[f"{name}.alpha"] = torch.tensor(float(ad.scale * rank))
    return out


def to_diffusers(adapters: dict[str, ModuleAdapter]) -> dict[str, torch.Tensor]:
    """diffusers/PEFT names with the scale baked into lora_B (alpha == rank), so no reader can mis-scale it."""
    out: dict[str, torch.Tensor] = {}
    for path, ad in adapters.items():
        t = ad.baked()
        if ad.kind == "lora":
            out[f"{path}.lora_A.weight"] = t["down"]
            out[f"{path}.lora_B.weight"] = t["up"]
            if ad.magnitude is not None:
                out[f"{path}.lora_magnitude_vector"] = ad.magnitude
        else:
            out.update({f"{path}.{k}": v for k, v in t.items()})
    return out


def from_peft(state: dict[str, torch.Tensor], component: str, scale: float) -> dict[str, ModuleAdapter]:
    """Adapters from a peft state dict (`get_peft_model_state_dict`) of one component trained with alpha/r = scale."""
    groups = group_keys({k: v for k, v in state.items()}, f"peft {component}")
    out = {}
    for name, parts in groups.items():
        ad = module_adapter(parts, name, f"peft {component}")
        ad.scale = scale
        out[f"{component}.{name}"] = ad
    return out
