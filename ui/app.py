"""The Gradio app: base and adapted outputs side by side (`adapt ui`).

`build_app(...)` returns the gr.Blocks without launching it (tests and notebooks
launch it themselves); `run(args)` is the `adapt ui` command.  The app knows no
recipe: each run's recipe applies itself (`Recipe.apply`) and declares any
extra inputs it needs (`Recipe.ui_inputs`, `Recipe.ui_prepare`); the app draws
one control per declared input and shows a recipe's group when one of its runs
is selected.
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from adapt.errors import AdaptError, ConfigError

from ui.engine import SWEEP_SCALES, Engine, Selection, Settings

log = logging.getLogger("adapt.ui")
EXTRA_SLOTS = 2          # adapters stacked on top of the main one, each with its own weight
HEADERS = ["adapter", "recipe", "base", "steps", "trigger", "created", "status"]
# Small models make small images: show them large, with visible pixels rather than blur.
CSS = """
#base-image img, #adapted-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#sweep-image img, #run-preview img { image-rendering: pixelated; }
"""


# ---- handlers' plumbing ----------------------------------------------------------------------
def _endpoint(fn, names: list[str]):
    """`fn` as a Gradio handler: named API parameters, a progress tracker, and errors shown in the page.

    Gradio finds gr.Progress only among named positional parameters, so the signature is declared explicitly;
    errors a user can fix reach the page as gr.Error (a message), never as a stack trace.
    """
    import inspect

    import gradio as gr

    def call(*args):
        *values, progress = args
        try:
            return fn(*values, progress=progress)
        except gr.Error:
            raise
        except AdaptError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:  # unexpected: traceback in the server log, one line in the page
            log.exception("%s failed", fn.__name__)
            raise gr.Error(f"{fn.__name__} failed: {type(exc).__name__}: {exc}", print_exception=False) from None

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    call.__signature__ = inspect.Signature([inspect.Parameter(n, kind) for n in names]
                                           + [inspect.Parameter("progress", kind, default=gr.Progress())])
    call.__name__, call.__doc__ = fn.__name__, fn.__doc__
    return call


def _recipe_inputs():
    """[(recipe name, UIInput)] for every installed recipe that declares extra inputs."""
    from adapt.recipes import available_recipes

    return [(name, spec) for name, cls in available_recipes().items() for spec in cls.ui_inputs]


def _input_component(spec):
    import gradio as gr

    common = dict(label=spec.label, info=spec.info or None, elem_id=f"input-{spec.name}")
    if spec.kind == "image":
        common.pop("info")
        return gr.Image(type="pil", format="png", sources=["upload", "clipboard"], **common)
    if spec.kind == "slider":
        return gr.Slider(spec.minimum, spec.maximum, value=spec.default if spec.default is not None else spec.minimum,
                         step=spec.step, **common)
    if spec.kind == "number":
        return gr.Number(value=spec.default, **common)
    if spec.kind == "checkbox":
        return gr.Checkbox(value=bool(spec.default), **common)
    return gr.Textbox(value=spec.default, **common)


class _Handlers:
    """The functions behind the widgets; inputs arrive as flat positional values."""

    def __init__(self, engine: Engine, recipe_inputs, out_dir: Path):
        self.engine, self.recipe_inputs, self.out_dir = engine, recipe_inputs, out_dir

    def unpack(self, values):
        """(Selection, Settings) from [adapter, scale, (extra, weight)*, prompt, negative, seed, steps, cfg, sampler,
        size, *recipe inputs]."""
        n = 2 + 2 * EXTRA_SLOTS
        slots, (prompt, negative, seed, steps, cfg, sampler, size), extras = values[:n], values[n:n + 7], values[n + 7:]
        adapters = [(slots[i], float(slots[i + 1] if slots[i + 1] is not None else 1.0))
                    for i in range(0, n, 2) if slots[i]]
        names = [a for a, _ in adapters]
        if len(set(names)) != len(names):
            raise ConfigError("the same adapter is selected twice; pick each adapter once")
        recipes = {self.engine_recipe(a) for a in names}
        inputs: dict[str, dict] = {}
        for (recipe, spec), value in zip(self.recipe_inputs, extras):
            if recipe in recipes and value is not None:
                inputs.setdefault(recipe, {})[spec.name] = value
        if seed is None or steps is None:
            raise ConfigError("seed and steps must be numbers")
        settings = Settings(prompt=prompt or "", negative_prompt=negative or "", seed=int(seed), steps=int(steps),
                            cfg=float(cfg), sampler=str(sampler), size=int(size) if size else None)
        return Selection(adapters, inputs), settings

    def engine_recipe(self, name: str) -> str:
        from adapt.infer import read_run_meta

        return str(read_run_meta(self.engine.run_path(name)).get("recipe"))

    def save(self, image, stem: str) -> str:
        path = self.out_dir / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{random.randrange(10**6):06d}.png"
        image.save(path)
        return str(path)

    def compare(self, *values, progress=None):
        from adapt.infer import grid

        selection, settings = self.unpack(values)
        report = (lambda i, n, tag: progress((i, n), desc=f"{tag} image", unit="steps")) if progress else None
        base_img, adapted, previews = self.engine.compare(selection, settings, report)
        pair = grid([base_img, adapted], 1, 2, col_labels=["base", "adapted"], cell=max(128, base_img.width))
        text = self.engine.reproduce(selection, settings)
        txt = Path(self.save(pair, "compare")).with_suffix(".txt")
        txt.write_text(text)
        status = (f"seed **{settings.seed}** · {settings.steps} steps · {settings.sampler} · CFG {settings.cfg:g} · "
                  f"{base_img.width}px · " + ", ".join(f"{n} ×{w:g}" for n, w in selection.adapters))
        import gradio as gr

        shown = gr.update(value=previews or None, visible=bool(previews))
        return (base_img, adapted, shown, str(txt.with_suffix(".png")), text, str(txt), status)

    def sweep(self, n_seeds, *values, progress=None):
        selection, settings = self.unpack(values)
        report = (lambda i, n, tag: progress((i, n), desc=tag, unit="images")) if progress else None
        sheet = self.engine.sweep(selection, settings, int(n_seeds or 1), SWEEP_SCALES, report)
        return sheet, self.save(sheet, "sweep")

    def runs_table(self):
        runs = self.engine.runs()
        return runs, [r.row() for r in runs]

    def refresh(self, *current):
        import gradio as gr

        runs, rows = self.runs_table()
        choices = [(r.label(), r.name) for r in runs]
        names = {r.name for r in runs}
        updates = [gr.update(choices=choices, value=c if c in names else None) for c in current]
        return (*updates, rows)

    def describe(self, name, prompt):
        """Info, prompt with the trigger, preview, and whether generation is possible, for the main adapter."""
        import gradio as gr
        from PIL import Image

        info = next((r for r in self.engine.runs() if r.name == name), None)
        if info is None:
            return "Select an adapter (or press refresh).", prompt, None, gr.update(interactive=False), gr.update(interactive=False)
        lines = [f"**{info.name}** — recipe `{info.recipe}`, {info.meta.get('steps', '?')} steps, "
                 f"base `{info.meta.get('base_model', '?')}`, created {info.meta.get('created', '?')}"]
        if info.trigger:
            lines.append(f"trigger: `{info.trigger}`")
            if info.trigger not in (prompt or ""):
                prompt = f"{info.trigger} {prompt}".strip() if prompt else info.trigger
        if not info.usable:
            lines.append(f"⛔ unavailable: {info.reason}")
        preview = Image.open(info.preview).convert("RGB") if info.preview else None
        ok = gr.update(interactive=info.usable)
        return "\n\n".join(lines), prompt, preview, ok, ok

    def groups(self, *names):
        """Show the input group of each recipe among the selected adapters."""
        import gradio as gr

        recipes = set()
        for name in names:
            try:
                recipes.add(self.engine_recipe(name)) if name else None
            except AdaptError:
                continue
        seen = list(dict.fromkeys(r for r, _ in self.recipe_inputs))
        return [gr.update(visible=r in recipes) for r in seen]


def _controls(ui, h, choices, first, recipe_inputs, native: int, multiple: int) -> None:
    """The left column: adapters (main, stacked, recipe inputs) and generation settings, stored on `ui`."""
    import gradio as gr

    from adapt.infer import sampler_names

    # allow_custom_value: the server checks every name itself (ui.runs.resolve_run refuses anything outside the
    # runs folder); Gradio's own check would use the choices frozen at build time.
    with gr.Row():
        ui.adapter = gr.Dropdown(choices, value=first.name if first else None, label="Adapter", scale=4,
                                 allow_custom_value=True, elem_id="adapter")
        ui.refresh = gr.Button("↻ Refresh", scale=1, size="sm", elem_id="refresh")
    start = h.describe(first.name, first.trigger) if first else (
        "Train an adapter with `adapt train` (or `adapt demo`), then press refresh.", "", None)
    ui.info = gr.Markdown(start[0], elem_id="adapter-info")
    ui.run_preview = gr.Image(start[2], label="Its training preview", type="pil", interactive=False, height=140,
                              elem_id="run-preview")
    ui.slots = [ui.adapter, gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Adapter scale", elem_id="scale")]
    with gr.Accordion("Stack more adapters (per-adapter weight)", open=False):
        for i in range(EXTRA_SLOTS):
            with gr.Row():
                ui.slots.append(gr.Dropdown(choices, value=None, label=f"Also apply #{i + 1}", scale=3,
                                            allow_custom_value=True, elem_id=f"extra-{i + 1}"))
                ui.slots.append(gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="weight", scale=2))
    ui.groups, ui.extra_inputs = [], []
    for recipe in dict.fromkeys(r for r, _ in recipe_inputs):
        with gr.Group(visible=bool(first) and first.recipe == recipe) as group:
            gr.Markdown(f"**{recipe}** inputs")
            ui.extra_inputs += [_input_component(s) for r, s in recipe_inputs if r == recipe]
        ui.groups.append(group)
    ui.prompt = gr.Textbox(value=(first.trigger if first else ""), label="Prompt", lines=2, elem_id="prompt",
                           placeholder="a red circle on a blue background")
    ui.negative = gr.Textbox(label="Negative prompt", elem_id="negative")
    with gr.Row():
        ui.seed = gr.Number(0, precision=0, label="Seed", elem_id="seed", scale=3)
        ui.dice = gr.Button("Random seed", size="sm", scale=1, elem_id="random-seed")
    ui.settings = [gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="steps"),
                   gr.Slider(0.0, 20.0, value=5.0, step=0.5, label="CFG scale", elem_id="cfg"),
                   gr.Dropdown(sampler_names(), value="ddim", label="Sampler", elem_id="sampler"),
                   gr.Slider(multiple, max(native * 2, multiple), value=native, step=multiple, label="Size (px)",
                             elem_id="size")]


def _outputs(ui, rows, enabled: bool) -> None:
    """The right column: side by side, strength sweep, the adapters table, stored on `ui`."""
    import gradio as gr

    with gr.Tab("Side by side"):
        ui.go = gr.Button("Generate", variant="primary", elem_id="generate", interactive=enabled)
        ui.status = gr.Markdown(elem_id="status")
        with gr.Row():
            ui.base_img = gr.Image(label="Base", type="pil", format="png", interactive=False, height=340,
                                   elem_id="base-image")
            ui.adapted_img = gr.Image(label="Adapted", type="pil", format="png", interactive=False, height=340,
                                      elem_id="adapted-image")
        ui.previews = gr.Gallery(label="Recipe inputs as the model sees them", format="png", columns=4, height=160,
                                 visible=False, elem_id="recipe-previews")
        with gr.Row():
            ui.pair_file = gr.DownloadButton("Download side-by-side PNG", elem_id="download-pair")
            ui.repro_file = gr.DownloadButton("Download reproduce.txt", elem_id="download-reproduce")
        ui.repro = gr.Code(label="Reproduce with `adapt sample`", language="shell", lines=3, wrap_lines=True,
                           elem_id="reproduce")
    with gr.Tab("Strength sweep"):
        gr.Markdown(f"Columns: adapter scale {' → '.join(f'{s:g}' for s in SWEEP_SCALES)}; rows: seeds seed, seed+1, "
                    "… (every weight is multiplied by the column's scale).")
        ui.n_seeds = gr.Slider(1, 4, value=2, step=1, label="Seeds (rows)", elem_id="sweep-seeds")
        ui.go_sweep = gr.Button("Run sweep", variant="primary", elem_id="sweep", interactive=enabled)
        ui.sweep_img = gr.Image(label="Sweep", type="pil", format="png", interactive=False, elem_id="sweep-image")
        ui.sweep_file = gr.DownloadButton("Download grid PNG", elem_id="download-grid")
    with gr.Tab("Adapters"):
        ui.table = gr.Dataframe(rows or None, headers=HEADERS, interactive=False, elem_id="runs-table")


def _wire(ui, h, recipe_inputs) -> None:
    """Events: generation through the queue (named API endpoints), refresh, adapter info, recipe groups."""
    import gradio as gr

    inputs = [*ui.slots, ui.prompt, ui.negative, ui.seed, *ui.settings, *ui.extra_inputs]
    names = ["adapter", "scale"] + [f"{k}_{i + 1}" for i in range(EXTRA_SLOTS) for k in ("extra", "weight")]
    names += ["prompt", "negative_prompt", "seed", "steps", "cfg", "sampler", "size"]
    names += [f"{r}_{s.name}" for r, s in recipe_inputs]
    ui.go.click(_endpoint(h.compare, names), inputs, [ui.base_img, ui.adapted_img, ui.previews, ui.pair_file, ui.repro,
                                                      ui.repro_file, ui.status], api_name="compare")
    ui.go_sweep.click(_endpoint(h.sweep, ["n_seeds", *names]), [ui.n_seeds, *inputs], [ui.sweep_img, ui.sweep_file],
                      api_name="sweep")
    ui.dice.click(lambda: random.randrange(2**31), None, ui.seed, api_name="random_seed", queue=False)
    dropdowns = ui.slots[0::2]
    ui.refresh.click(h.refresh, dropdowns, [*dropdowns, ui.table], api_name="refresh")
    ui.app.load(h.refresh, dropdowns, [*dropdowns, ui.table], api_visibility="private")
    ui.adapter.change(h.describe, [ui.adapter, ui.prompt], [ui.info, ui.prompt, ui.run_preview, ui.go, ui.go_sweep],
                      api_visibility="private")
    for dd in dropdowns if ui.groups else ():
        dd.change(h.groups, dropdowns, ui.groups, api_visibility="private")

    def adapters() -> list[dict]:
        """Every run in the runs folder: name, recipe, metadata, usable, and the reason when not."""
        return [{"name": r.name, "recipe": r.recipe, "usable": r.usable, "reason": r.reason, "meta": r.meta}
                for r in h.engine.runs()]

    gr.api(adapters, api_name="adapters")


def build_app(base=None, runs_dir: str | Path = "runs", device: str | None = None, engine: Engine | None = None):
    """The app as a gr.Blocks (not launched).  `base`: a path (default: the embedded tiny base) or a BaseModel."""
    import types

    import gradio as gr

    engine = engine or Engine(base, runs_dir, device)
    recipe_inputs = _recipe_inputs()
    out_dir = Path(tempfile.mkdtemp(prefix="adapt-ui-"))  # downloads; Gradio serves copies from its own cache
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    h = _Handlers(engine, recipe_inputs, out_dir)
    runs, rows = h.runs_table()
    first = next((r for r in runs if r.usable), None)
    facts, native = engine.facts, engine.base.sample_size
    ui = types.SimpleNamespace()
    with gr.Blocks(title="adapt — base vs adapted", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        ui.app = app
        gr.Markdown(f"## adapt · base vs adapted\nBase `{facts['base_model']}` ({facts['family']}, "
                    f"{facts['prediction_type']}, {native}px) on {engine.base.device.type} · runs folder `{engine.runs_dir}`")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                _controls(ui, h, [(r.label(), r.name) for r in runs], first, recipe_inputs, native, engine.size_multiple)
            with gr.Column(scale=2):
                _outputs(ui, rows, enabled=bool(first))
        _wire(ui, h, recipe_inputs)
    app.adapt_engine, app.adapt_handlers = engine, h
    return app


# ---- `adapt ui` --------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default=None, help="base model folder / .safetensors (default: the embedded tiny world)")
    parser.add_argument("--runs", default="runs", help="folder whose runs (adapters) the app offers (default: runs/)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off unless asked)")
    parser.add_argument("--auth", default=None,
                        help="require a login, user:pass (or set ADAPT_UI_AUTH to keep it out of the process list)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def parse_auth(text: str | None):
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth must look like user:password (both non-empty)")
    return (user, password)


def launch(app, host: str = "127.0.0.1", port: int | None = None, share: bool = False, auth=None, block: bool = True):
    app.queue(default_concurrency_limit=1, max_size=32)
    return app.launch(server_name=host, server_port=port, share=share, auth=auth, prevent_thread_lock=not block,
                      max_file_size="20mb", show_error=False, quiet=not block, footer_links=["api"], css=CSS)


def run(args: argparse.Namespace) -> int:
    auth = parse_auth(args.auth or os.environ.get("ADAPT_UI_AUTH"))
    if args.host not in ("127.0.0.1", "localhost", "::1") and auth is None:
        print(f"warning: binding {args.host} without --auth: anyone on your network can use this app", file=sys.stderr)
    app = build_app(args.base, args.runs, args.device)
    launch(app, args.host, args.port, args.share, auth, block=True)
    return 0
