"""Applying imported adapters to a pipeline, and fusing them into the base.

Plain LoRA/DoRA layers go through diffusers' own loader (`pipe.load_lora_weights`) so
they behave exactly like a diffusers-format file.  LoHa and LoKr, which diffusers'
SD loader refuses, are injected as peft LoHa/LoKr layers (the same layers the LoRA
recipe trains with), whose factors are replaced by the file's; the per-layer scale is
baked into the factors so `pipe.set_adapters(..., adapter_weights=...)` scales every
kind the same way.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from adapt.export.convention import ModuleAdapter
from adapt.export.files import diffusers_state_dict, load_lora_file


class _NoEmptyTextEncoderNote(logging.Filter):
    """Drop diffusers' "No LoRA keys associated to CLIPTextModel ..." warning: a UNet-only adapter is normal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No LoRA keys associated to")


def quiet_empty_text_encoder_note() -> None:
    """Install the filter once on the diffusers loggers that print it (every other message stays)."""
    for name in ("diffusers.loaders.lora_base", "diffusers.loaders.peft", "diffusers.loaders.lora_pipeline"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoEmptyTextEncoderNote) for f in logger.filters):
            logger.addFilter(_NoEmptyTextEncoderNote())


PEFT_PARAMS = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
               "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}


def load_into(pipe, adapters: dict[str, ModuleAdapter], name: str) -> list[str]:
    """Add `adapters` to the pipeline under adapter name(s) derived from `name`; returns the names used."""
    names = []
    by_kind: dict[str, dict[str, ModuleAdapter]] = {}
    for path, ad in adapters.items():
        by_kind.setdefault(ad.kind, {})[path] = ad
    for kind, group in sorted(by_kind.items()):
        adapter_name = name if len(by_kind) == 1 else f"{name}_{kind}"
        if kind == "lora":
            quiet_empty_text_encoder_note()
            pipe.load_lora_weights(diffusers_state_dict(group), adapter_name=adapter_name)
        else:
            _inject_lycoris(pipe, kind, group, adapter_name)
        names.append(adapter_name)
    return names


def _inject_lycoris(pipe, kind: str, adapters: dict[str, ModuleAdapter], adapter_name: str) -> None:
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model

    config_cls = LoHaConfig if kind == "loha" else LoKrConfig
    for component in ("unet", "text_encoder"):
        group = {p.split(".", 1)[1]: ad for p, ad in adapters.items() if p.startswith(component + ".")}
        if not group:
            continue
        model = getattr(pipe, component)
        # r=alpha=1 so that peft's scaling equals the weight set_adapters gives; the file's scale is baked below.
        config = config_cls(r=1, alpha=1, target_modules=sorted(group), init_weights=False)
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
        for path, ad in group.items():
            layer = model.get_submodule(path)
            weight = layer.get_base_layer().weight
            for pname in PEFT_PARAMS[kind]:  # the file decides which factors exist and their shapes
                params = getattr(layer, pname)
                if adapter_name in params:
                    del params[adapter_name]
            for pname, tensor in ad.baked().items():
                getattr(layer, pname)[adapter_name] = torch.nn.Parameter(
                    tensor.to(weight.device, torch.float32), requires_grad=False)
        if not hasattr(model, "peft_config"):
            model.peft_config = {}
        model.peft_config[adapter_name] = config
        model._hf_peft_config_loaded = True  # what diffusers/transformers check before set_adapters


def apply_file(pipe, path: str | Path, name: str) -> list[str]:
    """Load an adapter file of any supported convention into the pipeline (checked against its layers)."""
    adapters, _ = load_lora_file(path, pipe)
    return load_into(pipe, adapters, name)


def fuse(pipe) -> None:
    """Merge every active adapter, at the weights set with set_adapters, into the base weights; remove the layers."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge(safe_merge=True)
        recurse_remove_peft_layers(model)
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if hasattr(model, attr):
                delattr(model, attr) if attr == "peft_config" else setattr(model, attr, False)
