"""Diffusers -> original LDM ("A1111 / Civitai single file") key layout, for SD1-style models.

A single-file checkpoint holds the three trained networks under fixed prefixes:
UNet `model.diffusion_model.*`, VAE `first_stage_model.*`, CLIP text encoder
`cond_stage_model.transformer.*`.  Diffusers ships only the opposite direction
(`diffusers.loaders.single_file_utils.convert_ldm_*_checkpoint`, used by
`from_single_file`); this module writes the inverse, driven by the models'
configs so that any number of blocks / layers per block works (the tiny test
fixture has 2 blocks with 1 layer each, SD1.5 has 4 with 2).

Written by hand because neither diffusers nor peft exports this layout.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

# Layers outside the blocks: diffusers name -> LDM name.
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
# Inside a UNet ResBlock: diffusers name -> LDM name.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_TOP = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# VAE mid-block attention: diffusers uses Linear layers, LDM 1x1 convolutions.
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _layers_per_block(config, n_blocks: int) -> int:
    lpb = config["layers_per_block"]
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise ValueError(f"layers_per_block={lpb}: the LDM layout needs the same number of layers in every block")
        lpb = lpb[0]
    return int(lpb)


def _unet_prefix_map(config) -> dict[str, tuple[str, dict]]:
    """diffusers module prefix -> (LDM prefix, renames inside that module)."""
    n_down, n_up = len(config["down_block_types"]), len(config["up_block_types"])
    lpb = _layers_per_block(config, n_down)
    out: dict[str, tuple[str, dict]] = {k: (v, {}) for k, v in _UNET_TOP.items()}
    # input_blocks.0 is conv_in; then per block: lpb (resnet[, attention]) entries and one downsampler but the last.
    idx = 1
    for b in range(n_down):
        for j in range(lpb):
            out[f"down_blocks.{b}.resnets.{j}"] = (f"input_blocks.{idx}.0", _UNET_RESNET)
            out[f"down_blocks.{b}.attentions.{j}"] = (f"input_blocks.{idx}.1", {})
            idx += 1
        if b < n_down - 1:
            out[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{idx}.0.op", {})
            idx += 1
    out["mid_block.resnets.0"] = ("middle_block.0", _UNET_RESNET)
    out["mid_block.attentions.0"] = ("middle_block.1", {})
    out["mid_block.resnets.1"] = ("middle_block.2", _UNET_RESNET)
    # Up blocks have lpb + 1 layers; the upsampler sits after the attention (slot 2) or the resnet (slot 1).
    idx = 0
    for b in range(n_up):
        has_attention = "CrossAttn" in config["up_block_types"][b]
        for j in range(lpb + 1):
            out[f"up_blocks.{b}.resnets.{j}"] = (f"output_blocks.{idx}.0", _UNET_RESNET)
            out[f"up_blocks.{b}.attentions.{j}"] = (f"output_blocks.{idx}.1", {})
            if j == lpb and b < n_up - 1:
                out[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{idx}.{2 if has_attention else 1}.conv", {})
            idx += 1
    return out


def _vae_prefix_map(config) -> dict[str, tuple[str, dict]]:
    n_down, n_up = len(config["down_block_types"]), len(config["up_block_types"])
    out: dict[str, tuple[str, dict]] = {k: (v, {}) for k, v in _VAE_TOP.items()}
    for b in range(n_down):
        for j in range(config["layers_per_block"]):
            out[f"encoder.down_blocks.{b}.resnets.{j}"] = (f"encoder.down.{b}.block.{j}", _VAE_RESNET)
        out[f"encoder.down_blocks.{b}.downsamplers.0.conv"] = (f"encoder.down.{b}.downsample.conv", {})
    # LDM numbers decoder levels from the lowest resolution up; diffusers in execution order.
    for b in range(n_up):
        level = n_up - 1 - b
        for j in range(config["layers_per_block"] + 1):
            out[f"decoder.up_blocks.{b}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", _VAE_RESNET)
        out[f"decoder.up_blocks.{b}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", {})
    for part in ("encoder", "decoder"):
        for k in range(2):
            out[f"{part}.mid_block.resnets.{k}"] = (f"{part}.mid.block_{k + 1}", _VAE_RESNET)
        out[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION)
    return out


def _rename(key: str, prefix_map: dict[str, tuple[str, dict]]) -> str:
    """Rename `key` by its longest matching module prefix; keys with no match keep their name."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in prefix_map:
            new_head, inner = prefix_map[head]
            rest = ".".join(parts[cut:])
            for old, new in inner.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            return f"{new_head}.{rest}"
    return key


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    config = unet.config
    if config.get("addition_embed_type") or config.get("class_embed_type"):
        raise ValueError("only SD1/SD2-style UNets (no added/class embeddings) can be written in the LDM layout")
    prefix_map = _unet_prefix_map(config)
    return {UNET_PREFIX + _rename(k, prefix_map): v for k, v in unet.state_dict().items()}


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    prefix_map = _vae_prefix_map(vae.config)
    out = {}
    for key, value in vae.state_dict().items():
        new = _rename(key, prefix_map)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # Linear -> 1x1 conv
        out[VAE_PREFIX + new] = value
    return out


def text_encoder_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """CLIP keys are the transformers keys under `cond_stage_model.transformer.text_model.`."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); the LDM layout keeps it.
        inner = key if key.startswith("text_model.") else "text_model." + key
        out[TEXT_ENCODER_PREFIX + inner] = value
    return out


def diffusers_to_ldm_state_dict(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """One flat state dict in the original LDM key layout (SD1-style CLIP text encoder)."""
    state = {}
    for part in (unet_to_ldm(unet), vae_to_ldm(vae), text_encoder_to_ldm(text_encoder)):
        state.update(part)
    return state


def save_single_file(base_or_pipe, path: str | os.PathLike, dtype: Optional[torch.dtype] = None) -> Path:
    """Write unet + vae + text_encoder of a BaseModel or diffusers pipeline as one LDM-layout .safetensors."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single-file checkpoints are written as .safetensors")
    state = diffusers_to_ldm_state_dict(base_or_pipe.unet, base_or_pipe.vae, base_or_pipe.text_encoder)
    tensors = {}
    for key, value in state.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous().clone()  # safetensors refuses shared or strided storage
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "written_by": "adapt"})
    os.replace(tmp, path)  # never leave a half-written checkpoint under the final name
    return path
