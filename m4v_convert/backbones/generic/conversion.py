"""``backbone: generic`` recipes: their side of the conversion job, and ``m4v-convert recipes --check``.

Read the checkpoint's config → build the model on the meta device and check the recipe against it
(:func:`check_recipe`; nothing loaded yet) → load the weights → swap the selected attention layers →
distill (stage 1 attention transfer, stage 2 end-to-end; the one job of
:mod:`m4v_convert.jobs.convert`) → save in the diffusers layout with ``conversion.json``,
``README.md`` and ``flops.{json,md}`` (the attention layers' FLOPs).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from m4v_convert.backbones.generic import model as G
from m4v_convert.convert import layer_ranges as _ranges
from m4v_convert.backbones import registry
from m4v_convert.errors import CheckpointError, M4VError, RecipeError
from m4v_convert.io.model_card import CardFacts
from m4v_convert.io.pipeline import pipeline_root
from m4v_convert.io.safetensors_io import read_header, refuse_integer_weights


# ============================================================================ checkpoint → config


@dataclass
class Source:
    """Where the model comes from: a config (always) and, for a conversion, its weights."""

    config: dict
    label: str
    folder: Path | None = None
    subfolder: str | None = None
    single_file: Path | None = None


def published_config(recipe, name: str | None) -> tuple[dict, str]:
    """(config, label) of the recipe's published config ``name``."""
    name, cfg = recipe.published_config(name)
    return cfg, f"published config {name!r} ({recipe.published[name].name})"


def read_source(recipe, checkpoint: Path | None, model: str | None = None) -> Source:
    """The config of ``checkpoint`` (folder, pipeline folder or single file) or of a published one."""
    spec = recipe.spec
    if checkpoint is None:
        cfg, label = published_config(recipe, model)
        src = Source(cfg, label)
    else:
        ckpt = Path(checkpoint).expanduser()
        if not ckpt.exists():
            raise CheckpointError(f"--checkpoint {ckpt} does not exist")
        if ckpt.is_file():
            if not spec.model.single_file:
                raise CheckpointError(f"--checkpoint {ckpt} is a file; recipe {recipe.name!r} loads a diffusers "
                                      "folder (set model.single_file: true to load single files)")
            cfg, label = published_config(recipe, model)
            src = Source(cfg, f"{ckpt.name} with {label}", single_file=ckpt)
        else:
            sub = spec.model.subfolder
            if sub is None:
                sub = "" if (ckpt / "config.json").is_file() else "transformer"
            cfg_path = ckpt / sub / "config.json"
            if not cfg_path.is_file():
                raise CheckpointError(f"--checkpoint {ckpt}: no config.json there or in transformer/ (expected a "
                                      f"diffusers {spec.model.class_name} folder)")
            try:
                cfg = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
            src = Source(cfg, str(cfg_path.parent), folder=ckpt, subfolder=sub or None)
    found = src.config.get("_class_name")
    if found is not None and found != spec.model.class_name:
        raise CheckpointError(f"{src.label}: the checkpoint holds a {found}, recipe {recipe.name!r} converts "
                              f"{spec.model.class_name} (field 'model.class')")
    return src


def meta_model(recipe, config: dict) -> torch.nn.Module:
    """The recipe's diffusers class built from ``config`` on the meta device (no memory, no weights)."""
    cls = G.diffusers_class(recipe.spec.model.class_name)
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            return cls.from_config(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot build {cls.__name__} from this config: {e}") from None


# ============================================================================ recipes --check


@dataclass
class CheckReport:
    recipe: str
    model_class: str
    source: str
    layers: list[G.LayerInfo]
    selected: list[int]
    mmdim: dict
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"recipe {self.recipe}: {self.model_class} from {self.source}",
               f"{len(self.layers)} attention layers match; --layers default selects {len(self.selected)}"]
        out.append(f"{'layer':>5}  {'module':<40} {'class':<22} {'heads×dim':>10}  {'Q/K/V':<14} {'O':<22} action")
        sel = set(self.selected)
        for info in self.layers:
            q = "x".join(map(str, info.shapes.get("q", ())))
            o = "x".join(map(str, info.shapes.get("out", ())))
            if info.fused_out:
                o += f" cols[{info.out[1][0]}:{info.out[1][1]}]"
            action = ("-> MM-DiM" + (f" (d={info.d_model}, {info.heads} SSM heads x {info.head_dim})"))\
                if info.index in sel else "kept"
            out.append(f"{info.index:>5}  {info.fqn:<40} {type(info.module).__name__:<22} "
                       f"{f'{info.heads}×{info.head_dim}':>10}  {q:<14} {o:<22} {action}")
        out.extend(f"note: {n}" for n in self.notes)
        return out


def check_recipe(recipe, checkpoint: Path | None = None, model: str | None = None,
                 layers: str | None = None) -> CheckReport:
    """Validate ``recipe`` against a checkpoint's config (or a published one) on the meta device."""
    from m4v_convert.convert import parse_layers

    if recipe.backbone != "generic":
        return registry.for_recipe(recipe).check(recipe, checkpoint, model, layers)  # refuses with the reason
    spec = recipe.spec
    if spec.tokens.layout == "streams":
        raise RecipeError(f"{recipe.path}: field 'tokens.layout' 'streams' (separate text and video weights) is "
                          "described but its conversion is not implemented: one MM-DiM shared by text and video "
                          "cannot take over two weight sets")
    src = read_source(recipe, checkpoint, model)
    net = meta_model(recipe, src.config)
    src.config = dict(net.config)  # with the class defaults of keys the file leaves out
    where = str(recipe.path)
    infos = G.find_layers(net, spec, where)
    for info in infos:
        G.layer_geometry(net, info, spec, src.config, recipe.mmdim, where)
    chosen = parse_layers(recipe.layers_or_default(layers), max(i.index for i in infos) + 1)
    known = {i.index for i in infos}
    missing = [i for i in chosen if i not in known]
    if missing:
        raise M4VError(f"--layers: {missing} are not attention layers of this recipe (layers: {sorted(known)})")
    _check_sources(net, spec, where)
    notes = []
    for part in ("q_norm", "k_norm"):
        n = getattr(spec.attention, part)
        if n is not None and n.kind == "layer_norm" and recipe.mmdim.get("bc_norm", "none") != "none":
            notes.append(f"attention.{part} is a LayerNorm: only its weight is carried onto the RMSNorm of "
                         "B/C (its mean subtraction and bias are not)")
    if spec.rope is None or spec.rope.source == "none":
        if recipe.mmdim.get("rotary"):
            notes.append("mmdim.rotary is on but the recipe names no RoPE source: B/C get no rotation")
    weights = src.single_file or (src.folder / (src.subfolder or "") if src.folder is not None else None)
    if weights is not None:  # safetensors only, and floats: from the headers, once the recipe is known good
        refuse_integer_weights(read_header(weights), str(weights), f"a {spec.model.class_name} checkpoint")
    return CheckReport(recipe=recipe.name, model_class=spec.model.class_name, source=src.label, layers=infos,
                       selected=chosen, mmdim=recipe.mmdim, config=src.config, notes=notes)


def _check_sources(net, spec, where: str) -> None:
    import inspect

    t, r = spec.tokens, spec.rope
    for what, src in (("tokens.text", t.text), ("rope", r)):
        if src is not None and src.source == "module_output" and G.get_module(net, src.module) is None:
            raise RecipeError(f"{where}: field '{what}.module' {src.module!r}: the model has no such submodule")
    params = inspect.signature(type(net).forward).parameters
    names = [("grid.input", spec.grid.input)]
    if spec.grid.args is not None:
        names += [(f"grid.args.{k}", getattr(spec.grid.args, k)) for k in ("frames", "height", "width")]
    for what, src in (("tokens.text.name", t.text), ("tokens.text_mask.name", t.text_mask)):
        if src.source in ("forward_arg", "zero_rows"):
            names.append((what, src.name))
    if spec.inputs is not None:
        names += [("inputs.timestep", spec.inputs.timestep), ("inputs.text", spec.inputs.text)]
        if spec.inputs.text_mask:
            names.append(("inputs.text_mask", spec.inputs.text_mask))
        names += [(f"inputs.extra.{k}", k) for k in spec.inputs.extra]
    for what, name in names:
        if name not in params:
            raise RecipeError(f"{where}: field '{what}' {name!r} is not an argument of "
                              f"{type(net).__name__}.forward (it takes {', '.join(p for p in params if p != 'self')})")


# ============================================================================ conversion


def load_teacher(recipe, src: Source, dtype: torch.dtype, device: torch.device):
    cls = G.diffusers_class(recipe.spec.model.class_name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if src.single_file is not None:
            import tempfile

            if not hasattr(cls, "from_single_file"):
                raise CheckpointError(f"{cls.__name__} cannot load single files (diffusers has no from_single_file "
                                      "for it); convert the checkpoint to the diffusers layout first")
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "config.json").write_text(json.dumps(src.config))
                model = cls.from_single_file(str(src.single_file), config=tmp, torch_dtype=dtype,
                                             local_files_only=True)
        else:
            kwargs = {"subfolder": src.subfolder} if src.subfolder else {}
            model = cls.from_pretrained(str(src.folder), torch_dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{src.label}: cannot load the {cls.__name__} weights: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return model.to(device).eval()


def as_converted(model: torch.nn.Module, recipe) -> torch.nn.Module:
    """Give ``model`` (a plain diffusers model) the converted class in place, no layer converted:
    its forward now records the per-call context (the teacher for stage 1)."""
    cls = G.converted_class(recipe.spec.model.class_name)
    model.__class__ = cls
    model._init_spec(recipe.spec)
    return model


def check_flags(flags, recipe) -> None:
    """What a generic recipe's conversion does not offer, refused before any weight is read
    (registry entry ``generic``)."""
    from m4v_convert.backbones.generic.distill import FINE_TUNE_UNSUPPORTED

    if flags.data is not None:
        raise M4VError(f"--data: stage 3 (fine-tune) is not offered here ({FINE_TUNE_UNSUPPORTED})")
    if flags.grad_checkpointing:
        raise M4VError("--grad-checkpointing: not offered for generic recipes")
    if flags.grad_checkpointing is None and (recipe.distill or {}).get("grad_checkpointing"):
        raise M4VError(f"{recipe.path}: distill.grad_checkpointing: not offered for generic recipes")
    if flags.teacher_calib or (flags.calib_cache is not None and flags.prompts is None):
        raise M4VError("--teacher-calib: not offered for generic recipes (the sampler depends on the backbone); "
                       "--prompts FILE samples the teacher through its pipeline where the recipe names one")
    sampling = [f for f, v in (("--calib-size", flags.calib_size), ("--calib-frames", flags.calib_frames),
                               ("--guidance-scale", flags.guidance_scale), ("--teacher-steps", flags.teacher_steps))
                if v is not None]
    if flags.prompts is None and sampling:
        raise M4VError(f"{' / '.join(sampling)}: they set the teacher's samples of --prompts; give --prompts FILE")
    if flags.prompts is not None:
        pipe = recipe.spec.pipeline
        if pipe is None:
            raise M4VError(f"--prompts: recipe {recipe.name} has no pipeline: section (the diffusers pipeline that "
                           "encodes a prompt and samples the teacher; docs/recipes.md)")
        if pipe.prompts_refused:
            raise M4VError(f"--prompts: not offered for recipe {recipe.name}: {pipe.prompts_refused}")
        if recipe.spec.grid.layout == "BNC":
            raise M4VError(f"--prompts: recipe {recipe.name} lays the latents out as packed tokens (grid.layout BNC); "
                           "samples are read from pipelines whose latents are BCFHW or BFCHW")
    if flags.train == "lora" or (flags.train is None and recipe.distill.get("train") == "lora"):
        raise M4VError("--train lora: not offered for generic recipes (no recipe field names the layers to adapt); "
                       "use mmdim or all")


class GenericConversion:
    """A generic recipe's side of the conversion job (:class:`m4v_convert.jobs.convert.Conversion`):
    the recipe is checked against the model built on the meta device before any weight is read."""

    transformer_folder = None
    pipeline = None
    prompts = None  # [(prompt, negative prompt)] of --prompts
    prompt_pipeline = None  # how the recipe's pipeline encodes and samples them (distill/pipeline_samples.py)
    distill_scope = ""

    def __init__(self, plan):
        self.plan = plan
        self.recipe = plan.recipe

    def check_before_loading(self) -> None:
        flags = self.plan.flags
        self.check = check_recipe(self.recipe, flags.checkpoint, flags.model, flags.layers)
        self.source = read_source(self.recipe, flags.checkpoint, flags.model)
        # a diffusers pipeline folder in: the same pipeline out, with the converted transformer/
        self.pipeline = pipeline_root(self.source.folder, self.source.subfolder)
        self.transformer_folder = self.source.subfolder if self.pipeline else None
        for note in self.check.notes:
            self.plan.console.print(f"[yellow]note:[/] {note}")
        if flags.prompts is not None:
            self._check_prompts()

    def _check_prompts(self) -> None:
        """--prompts checked before loading: the recipe's pipeline: section resolved against the config."""
        from m4v_convert.distill.pipeline_samples import PromptPipeline, check_prompt_flags, check_sample_count

        flags, spec, cfg, video = self.plan.flags, self.recipe.spec, self.source.config, self.recipe.video
        pipe = spec.pipeline
        _, ph, pw = G.patch_sizes(spec, cfg)
        self.prompt_pipeline = PromptPipeline(
            class_name=pipe.class_name, guidance_scale=float(pipe.guidance_scale), negative_prompt=pipe.negative_prompt,
            max_sequence_length=G.resolve_size(pipe.max_sequence_length, cfg, what="pipeline.max_sequence_length"),
            latent_layout=spec.grid.layout, temporal_compression=int(video["temporal_compression"]),
            spatial_compression=int(video["spatial_compression"]),
            side_multiple=int(video["spatial_compression"]) * max(ph, pw))
        exact = None if spec.inputs is None or spec.inputs.text_len is None else \
            G.resolve_size(spec.inputs.text_len, cfg, what="inputs.text_len")
        if exact is not None and exact != self.prompt_pipeline.max_sequence_length:
            raise RecipeError(f"{self.recipe.path}: pipeline.max_sequence_length "
                              f"({self.prompt_pipeline.max_sequence_length}) must equal inputs.text_len ({exact}): the "
                              "model takes exactly that many text tokens")
        self.prompts = check_prompt_flags(flags, self.pipeline, self.prompt_pipeline)
        check_sample_count(len(self.prompts), self.recipe, f"--prompts {flags.prompts}", "prompt(s)")

    def load_teacher(self):
        return load_teacher(self.recipe, self.source, self.plan.dtype, self.plan.device)

    def meta_teacher(self):
        """The teacher built from the checkpoint's config on the meta device (for the memory plan)."""
        return meta_model(self.recipe, self.source.config).eval()

    def select_layers(self, teacher) -> list[int]:
        return self.check.selected

    def loaded_line(self, teacher, layers: list[int]) -> str:
        return (f"loaded {type(teacher).__name__}: {len(self.check.layers)} attention layers, "
                f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M params; converting layers "
                f"{_ranges(layers)}")

    def make_student(self, teacher, layers: list[int]):
        recipe, cfg = self.recipe, dict(teacher.config)
        self.model_class = type(teacher).__name__
        student = G.converted_class(recipe.spec.model.class_name).from_teacher(teacher, recipe.spec, recipe.raw)
        as_converted(teacher, recipe)  # the teacher records its per-call context too (stage 1 reads it)
        student.convert_(G.selected_infos(student, recipe.spec, cfg, recipe.mmdim, layers, str(recipe.path)),
                         recipe.mmdim)
        return student

    def distill_adapter(self, teacher, student, layers: list[int]):
        """The generic adapter; None when the recipe has no ``inputs`` section and nothing is to be
        distilled (refused when a stage would run)."""
        from m4v_convert.backbones.generic.distill import GenericDistillAdapter
        from m4v_convert.distill.calibration import CalibSpec

        recipe, d, cfg = self.recipe, self.plan.distill, dict(teacher.config)
        spec = recipe.spec
        if spec.inputs is None:
            if any(k in (1, 2) and d.schedules[k].steps > 0 for k in d.stages):
                raise RecipeError(f"{recipe.path}: distillation needs the 'inputs' section (how calibration batches "
                                  "map onto the forward's arguments); without it pass --distill-steps 0 "
                                  "--stage2-steps 0")
            return None
        c = recipe.calib
        if not c:
            raise RecipeError(f"{recipe.path}: distillation needs the 'calib' section")
        # synthetic latents follow the model's patch sizes: one recipe serves variants that patch
        # time differently (CogVideoX 1.0: 1 frame, 1.5: 2 frames)
        size = {k: c[f"latent_{k}"] for k in ("frames", "height", "width")}
        fitted = {k: -(-n // p) * p for (k, n), p in zip(size.items(), G.patch_sizes(spec, cfg))}
        if fitted != size and self.plan.flags.calib is None and self.prompts is None:
            self.plan.console.print(f"note: synthetic calibration latents {fitted['frames']}×{fitted['height']}×"
                                    f"{fitted['width']} (the recipe's {size['frames']}×{size['height']}×"
                                    f"{size['width']}, rounded up to this model's patch sizes)")
        exact_text = (None if spec.inputs.text_len is None
                      else G.resolve_size(spec.inputs.text_len, cfg, what="inputs.text_len"))
        cspec = CalibSpec(in_channels=G.latent_channels(spec, cfg),
                          text_dim=G.resolve_size(spec.inputs.text_dim, cfg, what="inputs.text_dim"),
                          latent_frames=fitted["frames"], latent_height=fitted["height"],
                          latent_width=fitted["width"], text_len=exact_text or c["text_len"],
                          flow_shift=float(c.get("flow_shift", 1.0)))
        infos = G.selected_infos(teacher, spec, cfg, recipe.mmdim, layers, str(recipe.path))
        from m4v_convert.distill.pipeline_samples import default_sample_shape

        return GenericDistillAdapter(recipe=recipe, config=cfg, infos=infos, spec=cspec,
                                     num_samples=int(c.get("num_samples", 8)), exact_text_len=exact_text,
                                     prompts=self.prompts, pipeline=self.pipeline,
                                     prompt_pipeline=self.prompt_pipeline,
                                     sample_shape=default_sample_shape(self.plan.flags, recipe))

    def flops_report(self, config: dict, layers: list[int]) -> dict:
        flags = self.plan.flags
        report = generic_flops(self.recipe, self.check, flags.report_frames, flags.report_size)
        report["original_total_flops"] = report.get("attention_layers_flops")
        report["converted_total_flops"] = report.get("converted_layers_flops")
        return report

    def write_flops(self, report: dict, folder: Path) -> None:
        (folder / "flops.json").write_text(json.dumps(report, indent=2))
        (folder / "flops.md").write_text(_flops_markdown(report))

    def flops_line(self, report: dict) -> str:
        if report.get("original_total_flops") is None:
            return f"FLOPs: {report['note']}"
        return (f"FLOPs of the attention layers at {report['frames']}×{report['height']}×{report['width']}: "
                f"original {report['original_total_flops'] / 1e12:.4f} TFLOPs → converted "
                f"{report['converted_total_flops'] / 1e12:.4f} TFLOPs")

    def card_facts(self, config: dict, flops: dict) -> CardFacts:
        spec = self.recipe.spec
        text = (f"See `flops.md` / `flops.json`: the attention layers cost {flops['original_total_flops'] / 1e12:.4f} "
                f"TFLOPs, {flops['converted_total_flops'] / 1e12:.4f} TFLOPs converted, at "
                f"{flops['frames']}×{flops['height']}×{flops['width']} ({flops['scope']})."
                if flops.get("original_total_flops") is not None else flops["note"])
        return CardFacts(model=f"{self.model_class}, {len(self.check.layers)} attention layers ({spec.attention.pattern})",
                         inputs_of=f"`{self.model_class}`", flops=text)


# ============================================================================ FLOPs (attention sub-layers)


def generic_flops(recipe, report: CheckReport, frames: int | None, size: tuple[int, int] | None) -> dict:
    """Attention vs MM-DiM FLOPs of the converted layers at a video size (analytic, batch 1)."""
    from m4v_convert.flops.analytic import attention_flops, mmdim_flops
    from m4v_convert.layers.mmdim import MMDiMConfig
    from m4v_convert.layers.recompose import VideoLayout

    v = recipe.video or {}
    frames = frames or v.get("report_frames")
    if size is None and v.get("report_height") and v.get("report_width"):
        size = (v["report_height"], v["report_width"])
    if not v or frames is None or size is None:
        return {"note": "no video size (pass --size and --frames; the recipe's video section gives the VAE "
                        "compression)"}
    h, w = size
    tc, sc = int(v.get("temporal_compression", 4)), int(v.get("spatial_compression", 8))
    lz = int(v.get("text_len", 0))
    spec = recipe.spec
    pt, ph, pw = G.patch_sizes(spec, report.config)
    lf = (frames - 1) // tc + 1
    layout = VideoLayout.single(max(1, lf // pt), max(1, h // sc // ph), max(1, w // sc // pw))
    n = layout.num_tokens
    joint = spec.tokens.layout == "joint"
    rows, orig, conv = [], 0, 0
    for info in report.layers:
        att = attention_flops(n + (lz if joint else 0), info.d_model, info.heads, info.head_dim)["total"]
        orig += att
        if info.index in report.selected:
            cfgm = MMDiMConfig(d_model=info.d_model, nheads=info.heads, headdim=info.head_dim,
                               layer_index=info.index, **recipe.mmdim)
            m = mmdim_flops(cfgm, layout, lz if cfgm.text_sandwich else 0)["total"]
            conv += m
            rows.append({"layer": info.index, "attention": att, "mmdim": m})
        else:
            conv += att
    return {"frames": frames, "height": h, "width": w, "tokens": n, "text_len": lz, "joint": joint,
            "attention_layers_flops": orig, "converted_layers_flops": conv, "layers": rows,
            "scope": "attention sub-layers only (projections + scores / MM-DiM as implemented)"}


def _flops_markdown(f: dict) -> str:
    if "note" in f:
        return f"# FLOPs\n\n{f['note']}\n"
    rows = "\n".join(f"| {r['layer']} | {r['attention'] / 1e9:.3f} | {r['mmdim'] / 1e9:.3f} |" for r in f["layers"])
    return (f"# FLOPs at {f['frames']}x{f['height']}x{f['width']} ({f['tokens']} video tokens, "
            f"text {f['text_len']})\n\n"
            f"Scope: {f['scope']}.\n\n| layer | attention GFLOPs | MM-DiM GFLOPs |\n|---:|---:|---:|\n{rows}\n\n"
            f"All attention layers: {f['attention_layers_flops'] / 1e12:.4f} TFLOPs → "
            f"{f['converted_layers_flops'] / 1e12:.4f} TFLOPs after conversion.\n")


def published_flops(recipe, config: dict, model: str, size: tuple[int, int] | None, frames: int | None,
                    layers: str | None, crosscheck: bool) -> tuple[dict, str]:
    """``m4v-convert flops`` for a generic recipe's published config (registry entry ``generic``):
    the analytic count of the attention sub-layers (no FlopCounterMode cross-check)."""
    report = generic_flops(recipe, check_recipe(recipe, model=model, layers=layers), frames, size)
    return report, _flops_markdown(report)
