"""Training metadata for adapter file headers, in kohya sd-scripts' `ss_*` vocabulary where a key has a meaning.

A1111/Forge show these in their LoRA info panel and Civitai reads them on upload;
only keys whose meaning we can honour are written (no fake optimizer or dataset stats).
"""
from __future__ import annotations

import json

from adapt.export.convention import ModuleAdapter

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
NETWORK_MODULE = {"lora": "networks.lora", "loha": "lycoris.kohya", "lokr": "lycoris.kohya"}


def training_metadata(run: dict, adapters: dict[str, ModuleAdapter]) -> dict[str, str]:
    """ss_* keys from an adapt run's metadata (adapt_run.json / the recipe's header) and the adapters themselves."""
    kinds = sorted({a.kind for a in adapters.values()})
    kind = kinds[0] if len(kinds) == 1 else "mixed"
    ranks = sorted({a.rank for a in adapters.values() if a.rank})
    alpha = next((a.scale * a.rank for a in adapters.values() if a.rank), None)
    if not ranks and run.get("adapt.rank"):  # LoKr with two full factors has no inner rank: report the configured one
        ranks, alpha = [int(run["adapt.rank"])], float(run.get("adapt.alpha") or run["adapt.rank"])
    dora = any(a.magnitude is not None for a in adapters.values())
    res = run.get("resolution")
    triggers = [t.strip() for t in str(run.get("trigger") or "").split(",") if t.strip()]
    meta = {
        "ss_base_model_version": BASE_MODEL_VERSION.get(str(run.get("family")), str(run.get("family") or "unknown")),
        "ss_sd_model_name": str(run.get("base_model") or ""),
        "ss_network_module": NETWORK_MODULE.get(kind, "lycoris.kohya"),
        "ss_network_dim": str(ranks[-1]) if ranks else "",
        "ss_network_alpha": f"{alpha:g}" if alpha is not None else "",
        "ss_resolution": f"({res}, {res})" if res else "",
        "ss_steps": str(run.get("steps") or ""), "ss_max_train_steps": str(run.get("steps") or ""),
        "ss_seed": str(run.get("seed") or ""),
        "ss_v2": "True" if run.get("family") == "sd2" else "False",
        "ss_training_comment": f"trained with adapt; trigger words: {', '.join(triggers) or '(none)'}",
        # kohya counts caption tags per dataset folder; the trigger words are the tags a user needs to know.
        "ss_tag_frequency": json.dumps({"trigger": {t: 1 for t in triggers}}) if triggers else "",
        "ss_network_args": json.dumps({"algo": kind, **({"dora_wd": "True"} if dora else {})}),
        "modelspec.trigger_phrase": ", ".join(triggers),
        "adapt.type": kind + ("+dora" if dora else ""),
    }
    if run.get("prediction_type") == "v_prediction":
        meta["ss_v_parameterization"] = "True"
    return {k: v for k, v in meta.items() if v != ""}
