"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the base UNet's encoder (diffusers' `ControlNetModel.from_unet`)
reads a conditioning image and adds its features to the frozen UNet's skip
connections through zero-initialised 1x1 convolutions ("zero convs"), so at
initialisation the base model is reproduced exactly and training starts from it.
The base UNet, VAE and text encoder stay frozen.

The artifact is a plain diffusers ControlNet folder (run_dir/controlnet/) that
`StableDiffusionControlNetPipeline` loads without adapt installed.
"""
from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field

from adapt.config import Section
from adapt.errors import ConfigError, DataError, ModelLoadError
from adapt.recipes import Recipe, UIInput, register_recipe
from adapt.train.diffusion import batch_latents, batch_text, unet_predictor

SUBFOLDER = "controlnet"
EXAMPLE_CONTROL = "control_example.png"
INFO_FILE = "adapter_info.json"
# diffusers' default conditioning embedding (4 widths = 3 stride-2 convs = VAE factor 8); we keep its widths
# and cut or extend it so the number of downsamplings matches the base's VAE.
DEFAULT_EMBEDDING = (16, 32, 96, 256)
# UNet config keys a ControlNet must share with the base whose skip connections it feeds.
LAYOUT_KEYS = ("in_channels", "cross_attention_dim", "block_out_channels", "down_block_types", "layers_per_block")


class ControlNetConfig(Section):
    init_from: Optional[str] = Field(None, description="Start from an existing diffusers ControlNet folder (or an adapt controlnet run) built for the same base layout; default: copy the base UNet's encoder.")
    conditioning_embedding_out_channels: Optional[list[int]] = Field(None, description="Widths of the conditioning-image encoder; its length - 1 must equal log2(VAE scale factor). Default: derived from the base (16, 32, 96, 256 for SD's factor 8).")
    preprocessor: Optional[Literal["canny", "as_is"]] = Field(None, description="Compute each training image's conditioning map (once, cached): 'canny' edges or 'as_is' (the image itself); replaces any conditioning images of the dataset. Default: the dataset's conditioning images (role: control).")
    canny_low: float = Field(100.0, ge=0, description="Canny low threshold (gradient magnitude on the 0..255 scale, as OpenCV).")
    canny_high: float = Field(200.0, ge=0, description="Canny high threshold.")
    canny_sigma: float = Field(0.0, ge=0, description="Gaussian blur before Canny (0 = none, like ControlNet's canny annotator).")
    proportion_empty_prompts: float = Field(0.0, ge=0, le=1, description="Caption dropout for classifier-free guidance: the probability of an empty caption, for subsets that set no caption_dropout of their own.")
    preview_control: Optional[str] = Field(None, description="Control image for preview grids (default: the first training item's conditioning map).")


def embedding_channels(vae_scale_factor: int) -> list[int]:
    """Conditioning-embedding widths whose stride-2 convs shrink the control image to the latent size."""
    downs = int(round(math.log2(vae_scale_factor)))
    widths = list(DEFAULT_EMBEDDING[:downs + 1])
    return widths + [DEFAULT_EMBEDDING[-1]] * (downs + 1 - len(widths))


def check_compatible(controlnet_config, unet_config, vae_scale_factor: int, where: str) -> None:
    """A ControlNet feeds residuals into the UNet's skips: its layout must match the base's exactly."""
    from adapt.base import detect_family

    diffs = [f"{k} {_plain(controlnet_config.get(k))} vs the base's {_plain(unet_config.get(k))}"
             for k in LAYOUT_KEYS if _plain(controlnet_config.get(k)) != _plain(unet_config.get(k))]
    if diffs:
        fam_cn, fam_base = detect_family(_Cfg(controlnet_config)), detect_family(_Cfg(unet_config))
        raise ModelLoadError(f"{where}: this ControlNet was built for another base (family {fam_cn}, the base is {fam_base}): "
                             + "; ".join(diffs) + ". Use a ControlNet trained for this base, or train one "
                             "(leave controlnet.init_from unset to start from the base's own UNet).")
    widths = controlnet_config.get("conditioning_embedding_out_channels") or DEFAULT_EMBEDDING
    if 2 ** (len(widths) - 1) != vae_scale_factor:
        raise ModelLoadError(f"{where}: its conditioning embedding downsamples the control image by {2 ** (len(widths) - 1)} "
                             f"but the base's VAE scale factor is {vae_scale_factor}; train a ControlNet for this base.")
    if controlnet_config.get("conditioning_channels", 3) != 3:
        raise ModelLoadError(f"{where}: expects {controlnet_config.get('conditioning_channels')}-channel control images; "
                             "adapt feeds RGB control images (3 channels).")


class _Cfg:
    """Attribute access over a config dict (detect_family reads attributes)."""

    def __init__(self, d):
        self.__dict__.update(dict(d))

    def __getattr__(self, name):
        return None


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def controlnet_folder(path: str | Path) -> Path:
    """A ControlNet folder given itself or an adapt run directory holding one."""
    path = Path(path).expanduser()
    for candidate in (path, path / SUBFOLDER):
        if (candidate / "config.json").is_file():
            return candidate
    raise ModelLoadError(f"{path}: no ControlNet here (missing config.json, and no {SUBFOLDER}/config.json); "
                         "pass a diffusers ControlNet folder or an adapt controlnet run directory.")


def load_controlnet(path: str | Path, unet_config, vae_scale_factor: int, allow_pickle: bool = False):
    """Load a ControlNet folder after checking (from its config alone) that it fits the base."""
    from diffusers import ControlNetModel

    folder = controlnet_folder(path)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelLoadError(f"{folder}/config.json is not valid JSON ({exc})") from None
    if config.get("_class_name") not in (None, "ControlNetModel"):
        raise ModelLoadError(f"{folder}: holds a {config.get('_class_name')}, not a ControlNetModel")
    check_compatible(config, unet_config, vae_scale_factor, str(folder))
    try:
        return ControlNetModel.from_pretrained(str(folder), use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: could not load the ControlNet weights ({exc}). Only .safetensors weights are "
                             "read unless base.allow_pickle is true.") from None


def _resolve(value: Optional[str], cfg) -> Optional[str]:
    """A relative path in a recipe file is relative to that file when it exists there."""
    if not value:
        return value
    p = Path(value).expanduser()
    if not p.is_absolute() and cfg.source and Path(cfg.source).is_file():
        candidate = Path(cfg.source).resolve().parent / p
        if candidate.exists():
            return str(candidate)
    return str(p)


@register_recipe("controlnet")
class ControlNet(Recipe):
    """A ControlNet trained against the frozen base; conditioning images from the dataset or a preprocessor."""

    Config = ControlNetConfig
    roles = ("control", "instance")
    ui_inputs = (
        UIInput("control_image", "image", "Control image", target="apply",
                info="the map the ControlNet follows (default: the run's control_example.png); grayscale is fine"),
        UIInput("preprocess", "checkbox", "Apply the run's preprocessor (e.g. canny edges of a photo)", default=False,
                target="apply"),
    )

    def __init__(self, cfg):
        super().__init__(cfg)
        self.controlnet = None
        self._example = None  # the preview control image (PIL)

    @classmethod
    def check_config(cls, cfg) -> None:
        rc = cfg.recipe_config
        if rc.canny_low > rc.canny_high:
            raise ConfigError(f"{cfg.source}: controlnet.canny_low ({rc.canny_low}) is above controlnet.canny_high "
                              f"({rc.canny_high}); set low <= high (e.g. 100 and 200)")
        for key in ("init_from", "preview_control"):
            value = _resolve(getattr(rc, key), cfg)
            if value and not Path(value).exists():
                raise ConfigError(f"{cfg.source}: controlnet.{key}: {value} does not exist — fix the path or remove the key")

    # ---- data ----------------------------------------------------------------------------------
    def setup_data(self, base, run_dir: Path, dataset):
        from adapt.data.cache import default_cache_dir
        from adapt.data.control import first_conditioning, with_caption_dropout, with_control_maps

        rc = self.rc
        if rc.preprocessor:
            params = ({"low": rc.canny_low, "high": rc.canny_high, "sigma": rc.canny_sigma}
                      if rc.preprocessor == "canny" else {})
            dataset, computed = with_control_maps(dataset, rc.preprocessor, params, default_cache_dir(self.cfg.data.cache_dir))
            print(f"control maps ({rc.preprocessor}): {computed} computed, {len(set(r.conditioning_path for r in dataset.records)) - computed} cached")
        else:
            missing = sorted({r.image_path for r in dataset.records if not r.conditioning_path})
            if missing:
                raise DataError(f"{len(missing)} training image(s) have no conditioning image, e.g. {missing[0]}. ControlNet "
                                "trains on (image, conditioning image) pairs: give the subset 'role: control' and a "
                                "conditioning_path (same file names), or set controlnet.preprocessor: canny to compute maps.")
        dataset = with_caption_dropout(dataset, rc.proportion_empty_prompts)
        if not rc.preview_control:
            self._example = first_conditioning(dataset)
        return dataset

    # ---- model ---------------------------------------------------------------------------------
    def prepare(self, base) -> list[torch.nn.Parameter]:
        from diffusers import ControlNetModel

        rc, factor = self.rc, base.vae_scale_factor
        if factor & (factor - 1):
            raise ConfigError(f"{base.source}: VAE scale factor {factor} is not a power of two; ControlNet cannot match it")
        if rc.init_from:
            self.controlnet = load_controlnet(_resolve(rc.init_from, self.cfg), base.unet.config, factor, self.cfg.base.allow_pickle)
        else:
            widths = rc.conditioning_embedding_out_channels or embedding_channels(factor)
            if 2 ** (len(widths) - 1) != factor:
                raise ConfigError(f"{self.cfg.source}: controlnet.conditioning_embedding_out_channels has {len(widths)} widths "
                                  f"({len(widths) - 1} downsamplings) but the base's VAE scale factor is {factor}: give "
                                  f"{int(math.log2(factor)) + 1} widths, e.g. {embedding_channels(factor)}, or leave it unset")
            # from_unet copies conv_in, time embedding, down blocks and mid block; diffusers zero-initialises the
            # conditioning embedding's last conv and every controlnet_block (the zero convs).
            self.controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=tuple(widths))
        self.controlnet.to(base.device)
        if self.controlnet.dtype != torch.float32:  # fp32 master weights whatever the base dtype
            self.controlnet.to(dtype=torch.float32)
        self.controlnet.requires_grad_(True)
        self.controlnet.train()
        if self.cfg.train.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
        return list(self.controlnet.parameters())

    def loss(self, batch, base):
        if "conditioning_pixel_values" not in batch:
            raise DataError(f"a training batch has no conditioning images ({', '.join(batch.get('image_path', [])[:4])}); "
                            "every subset needs role: control with a conditioning_path, or set controlnet.preprocessor")
        latents = batch_latents(batch, base)
        cond = batch_text(batch, base)
        control = batch["conditioning_pixel_values"].to(base.device, torch.float32)
        cn, unet = self.controlnet, base.unet

        def predict(noisy, timesteps):
            down, mid = cn(noisy.to(cn.dtype), timesteps, encoder_hidden_states=cond.to(cn.dtype),
                           controlnet_cond=control.to(cn.dtype), return_dict=False)
            return unet_predictor(unet, cond, down_block_additional_residuals=[d.to(unet.dtype) for d in down],
                                  mid_block_additional_residual=mid.to(unet.dtype))(noisy, timesteps)

        return self.objective.per_example_loss(latents, predict).mean(), {}

    # ---- checkpoints ---------------------------------------------------------------------------
    def trainable_state_dict(self, base):
        return {f"controlnet.{k}": v for k, v in self.controlnet.state_dict().items()}

    def load_trainable_state_dict(self, base, state):
        part = {k[len("controlnet."):]: v for k, v in state.items() if k.startswith("controlnet.")}
        self.controlnet.load_state_dict(part, strict=True)

    # ---- the artifact --------------------------------------------------------------------------
    def example_control(self, base):
        """The control image previews use (and a run falls back on when none is given)."""
        from PIL import Image

        from adapt.data.control import load_control_image

        if self.rc.preview_control:
            return load_control_image(_resolve(self.rc.preview_control, self.cfg))
        if self._example is not None:
            return self._example
        return Image.new("RGB", (base.sample_size, base.sample_size))  # before setup_data: a blank map

    def save(self, run_dir: Path, base, metadata: dict[str, str]) -> None:
        run_dir = Path(run_dir)
        tmp, final = run_dir / f".{SUBFOLDER}-tmp", run_dir / SUBFOLDER
        shutil.rmtree(tmp, ignore_errors=True)
        self.controlnet.save_pretrained(str(tmp), safe_serialization=True)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        self.example_control(base).save(run_dir / EXAMPLE_CONTROL)
        info = {**metadata, "adapt.recipe": "controlnet", "adapt.preprocessor": self.rc.preprocessor or "none",
                "adapt.preprocessor_params": json.dumps({"low": self.rc.canny_low, "high": self.rc.canny_high,
                                                         "sigma": self.rc.canny_sigma} if self.rc.preprocessor == "canny" else {}),
                "adapt.conditioning_embedding_out_channels": json.dumps(list(self.controlnet.config.conditioning_embedding_out_channels))}
        (run_dir / INFO_FILE).write_text(json.dumps(info, indent=2))
        write_model_card(run_dir, info)

    def preview_pipeline(self, base, scale: float = 1.0):
        pipe = control_pipeline(base.pipeline(), self.controlnet, self.example_control(base), scale)
        return pipe, {"image": self.example_control(base), "controlnet_conditioning_scale": float(scale)}

    @classmethod
    def ui_prepare(cls, run_dir: Path, values: dict, width: int, height: int):
        """The uploaded control image (or the run's example), optionally preprocessed, at the generation size."""
        from PIL import Image

        control = run_control_image(Path(run_dir), values.get("control_image"), bool(values.get("preprocess")))
        if control is None:
            raise ConfigError(f"{run_dir}: this ControlNet needs a control image; upload one in the app")
        control = control.resize((int(width), int(height)), Image.Resampling.LANCZOS)
        return {"control_image": control}, {}, [("control image, as the model sees it", control)]

    @classmethod
    def apply(cls, pipe, run_dir: Path, scale: float = 1.0, control_image=None, preprocess: bool = False, **kwargs):
        """A StableDiffusionControlNetPipeline sharing `pipe`'s components, with this run's ControlNet.

        control_image (path, PIL image or array) is stored on the returned pipeline and used by every call that
        passes no `image=` (so `adapt.infer.generate` needs no extra argument); without one, the run's
        control_example.png is used.  preprocess=True first applies the run's preprocessor (e.g. canny edges of a
        photo).  scale is controlnet_conditioning_scale; 0 gives exactly the base output.
        """
        run_dir = Path(run_dir)
        folder = controlnet_folder(run_dir)
        # Loaded once per base UNet: every pipeline over the same base (sample, compare, the UI) reuses it.
        cache = pipe.unet.__dict__.setdefault("_adapt_controlnets", {})
        weights = sorted(folder.glob("*.safetensors"))
        key = f"{folder.resolve()}@{weights[0].stat().st_mtime_ns if weights else 0}"  # a re-trained run reloads
        if key not in cache:
            cn = load_controlnet(folder, pipe.unet.config, pipe.vae_scale_factor)
            cn.to(pipe.unet.device)
            cache[key] = (cn if cn.dtype == pipe.unet.dtype else cn.to(dtype=pipe.unet.dtype)).eval()
        return control_pipeline(pipe, cache[key], run_control_image(run_dir, control_image, preprocess), scale)


# ---- inference --------------------------------------------------------------------------------
def run_control_image(run_dir: Path, control_image=None, preprocess: bool = False):
    """The control image to use with a run: the given one (path/PIL/array; grayscale -> RGB) or the run's
    control_example.png; with preprocess=True the run's own preprocessor (e.g. canny) is applied first."""
    from adapt.data.control import load_control_image
    from adapt.data.control import preprocess as run_preprocessor

    if control_image is None and (run_dir / EXAMPLE_CONTROL).is_file():
        control_image = run_dir / EXAMPLE_CONTROL
    control = load_control_image(control_image) if control_image is not None else None
    info = json.loads((run_dir / INFO_FILE).read_text()) if (run_dir / INFO_FILE).is_file() else {}
    name = info.get("adapt.preprocessor", "none")
    if control is not None and preprocess and name != "none":
        control = run_preprocessor(name, control, **json.loads(info.get("adapt.preprocessor_params", "{}")))
    return control


@functools.lru_cache(maxsize=None)
def _pipeline_class():
    from diffusers import StableDiffusionControlNetPipeline

    class ControlNetRunPipeline(StableDiffusionControlNetPipeline):
        """diffusers' ControlNet pipeline that remembers a control image and scale for calls that pass none.

        So callers that know nothing about control (adapt.infer.generate, previews, the UI) still work, and an
        explicit `image=` / `controlnet_conditioning_scale=` always wins.  Grayscale controls become RGB.
        """

        @classmethod
        def around(cls, pipe, controlnet, control_image, scale: float):
            parts = {k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
            new = cls(**parts, controlnet=controlnet, safety_checker=None, feature_extractor=None,
                      image_encoder=getattr(pipe, "image_encoder", None), requires_safety_checker=False)
            new.set_progress_bar_config(disable=True)
            for name, value in vars(pipe).items():  # e.g. the LoRA weights other recipes keep on the pipeline
                if name.startswith("_adapt_"):
                    setattr(new, name, value)
            new._adapt_control_image, new._adapt_control_scale = control_image, float(scale)
            return new

        def __call__(self, *args, image=None, controlnet_conditioning_scale=None, **kwargs):
            from adapt.data.control import load_control_image

            image = self._adapt_control_image if image is None else image
            if image is None:
                raise ConfigError("this pipeline has a ControlNet attached but no control image: pass one "
                                  "(apply(..., control_image=...) or `adapt sample --control IMAGE`)")
            image = [load_control_image(i) for i in image] if isinstance(image, (list, tuple)) else load_control_image(image)
            if controlnet_conditioning_scale is None:
                controlnet_conditioning_scale = self._adapt_control_scale
            return super().__call__(*args, image=image, controlnet_conditioning_scale=controlnet_conditioning_scale, **kwargs)

    return ControlNetRunPipeline


def control_pipeline(pipe, controlnet, control_image, scale: float = 1.0):
    """A ControlNet pipeline over `pipe`'s very components (no copies) with a remembered control image and scale."""
    return _pipeline_class().around(pipe, controlnet, control_image, scale)


def write_model_card(run_dir: Path, meta: dict[str, str]) -> None:
    pre = meta.get("adapt.preprocessor", "none")
    source = f"computed with the {pre} preprocessor" if pre != "none" else "the dataset's conditioning images"
    card = f"""# ControlNet trained with adapt

- base model: `{meta.get('base_model')}` (family: {meta.get('family')}, prediction: {meta.get('prediction_type')})
- conditioning: {source}
- steps: {meta.get('steps')}, resolution: {meta.get('resolution')}, seed: {meta.get('seed')}
- example control image: `{EXAMPLE_CONTROL}`

## Use it

```python
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image
controlnet = ControlNetModel.from_pretrained("{run_dir / SUBFOLDER}")
pipe = StableDiffusionControlNetPipeline.from_pretrained("{meta.get('base_model')}", controlnet=controlnet)
image = pipe("your prompt", image=Image.open("{run_dir / EXAMPLE_CONTROL}"), controlnet_conditioning_scale=1.0).images[0]
```

or `adapt sample --controlnet {run_dir} --control control.png --control-scale 1.0 --prompt "..."`.
"""
    (Path(run_dir) / "README.md").write_text(card)
