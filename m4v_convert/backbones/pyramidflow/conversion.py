"""PyramidFlow's side of the conversion job (:class:`m4v_convert.jobs.convert.Conversion`).

What differs from Wan: the teacher (the release folder layout, variant and resolution from the
recipe), the layer selection (single-stream blocks; double-stream / joint ones only where the
recipe allows), the pyramid-shaped calibration batches, the FLOPs of a generation unit, and the
output layout: the converted transformer is written where the release keeps its own,
``<out>/diffusion_transformer_<resolution>/{config.json, diffusion_pytorch_model.safetensors}``,
next to ``conversion.json``, ``README.md`` and ``flops.{json,md}``; ``load_converted(<out>)``
reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from m4v_convert.convert import layer_ranges as _ranges
from m4v_convert.convert import parse_layers
from m4v_convert.errors import M4VError
from m4v_convert.io.model_card import CardFacts


class PyramidFlowConversion:
    distill_scope = ", all stages"
    pipeline = None  # the release's own layout, not a diffusers pipeline folder

    def __init__(self, plan):
        from .flops import RESOLUTIONS
        from .loader import transformer_folder_name

        self.plan = plan
        self.recipe = plan.recipe
        self.height, self.width, self.max_frames = RESOLUTIONS[self.recipe.resolution]
        self.transformer_folder = transformer_folder_name(self.recipe.resolution)

    def check_before_loading(self) -> None:
        _check_layers_before_loading(self.plan.flags, self.recipe)

    def load_teacher(self):
        from .loader import _FOLDER_RE, _resolve_folder, load_pyramidflow

        recipe, plan = self.recipe, self.plan
        source_folder = _resolve_folder(Path(plan.flags.checkpoint), recipe.resolution)  # resolved once, loaded from
        teacher = load_pyramidflow(source_folder, variant=recipe.variant, resolution=recipe.resolution,
                                   dtype=plan.dtype, device=plan.device)
        if not _FOLDER_RE.match(source_folder.name):
            # the release's 384p and 768p configs are the same architecture: only the folder name tells them apart
            plan.console.print(f"note: {source_folder} is not named {self.transformer_folder}/, so its resolution "
                               f"cannot be checked; the recipe's {recipe.resolution} is assumed")
        return teacher

    def meta_teacher(self):
        """The teacher built from the release's config on the meta device (for the memory plan): the
        loader's checks of names and shapes run, no weight is read."""
        from .loader import _resolve_folder, load_pyramidflow

        recipe, plan = self.recipe, self.plan
        return load_pyramidflow(_resolve_folder(Path(plan.flags.checkpoint), recipe.resolution), variant=recipe.variant,
                                resolution=recipe.resolution, dtype=plan.dtype, device="meta")

    def select_layers(self, teacher) -> list[int]:
        recipe = self.recipe
        self.n_double, self.n_single = _block_counts(teacher.config, recipe.variant)
        layers = parse_layers(self.plan.layer_spec, self.n_double + self.n_single)
        check_layer_selection(layers, self.n_double, recipe.variant, recipe.allow_double_stream, self.n_single,
                              _layer_source(self.plan.flags.layers, recipe))
        return layers

    def loaded_line(self, teacher, layers: list[int]) -> str:
        cfg, recipe = teacher.config, self.recipe
        return (f"loaded PyramidFlow {recipe.variant} {recipe.resolution}: {self.n_double} double-stream + "
                f"{self.n_single} single-stream blocks, {cfg['num_attention_heads']} heads × "
                f"{cfg['attention_head_dim']}, {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M params; "
                f"converting layers {_ranges(layers)}")

    def make_student(self, teacher, layers: list[int]):
        from .converted import CONVERTED_FOR_VARIANT
        from .layout import LATENT_PATCH

        recipe = self.recipe
        spatial = int(recipe.video.get("spatial_compression", 8))
        full_grid = [self.height // spatial // LATENT_PATCH, self.width // spatial // LATENT_PATCH]
        student = CONVERTED_FOR_VARIANT[recipe.variant].from_teacher(teacher)
        student.convert_(layers, recipe.mmdim, meta={"full_grid": full_grid, "resolution": recipe.resolution,
                                                     "variant": recipe.variant})
        return student

    def distill_adapter(self, teacher, student, layers: list[int]):
        from .calibration import PyramidCalibSpec
        from .distill import PyramidDistillAdapter
        from .layout import LATENT_PATCH

        cfg, recipe, c = teacher.config, self.recipe, self.recipe.calib
        # calibration / fine-tune data: pyramid-shaped, all stages per call, noised the release's way;
        # miniFLUX's in_channels count the 2x2 patch (64 = 16·4), SD3's are the latent channels
        sd3 = recipe.variant == "sd3"
        channels = cfg["in_channels"] if sd3 else cfg["in_channels"] // (LATENT_PATCH * LATENT_PATCH)
        spec = PyramidCalibSpec(latent_channels=channels,
                                text_dim=cfg["joint_attention_dim"], pooled_dim=cfg["pooled_projection_dim"],
                                latent_frames=c["latent_frames"], latent_height=c["latent_height"],
                                latent_width=c["latent_width"], text_len=c["text_len"],
                                flow_shift=float(c.get("flow_shift", 1.0)),
                                corrupt_ratio=float(c.get("corrupt_ratio", 1 / 3)),
                                max_token_grid=cfg.get("pos_embed_max_size") if sd3 else None)
        spec.validate(f"recipe {recipe.name} calib")
        return PyramidDistillAdapter(layers=layers, spec=spec)

    def flops_report(self, config: dict, layers: list[int]) -> dict:
        from .flops import pyramidflow_flops_report

        recipe = self.recipe
        return pyramidflow_flops_report(config, self.max_frames, self.height, self.width,
                                        text_len=int(recipe.video.get("text_len", 128)), converted_layers=layers,
                                        mmdim=recipe.mmdim,
                                        name=f"{recipe.name} ({Path(self.plan.flags.checkpoint).name})")

    def write_flops(self, report: dict, folder: Path) -> None:
        from .flops import markdown_report

        (folder / "flops.json").write_text(json.dumps(report, indent=2))
        (folder / "flops.md").write_text(markdown_report(report))

    def flops_line(self, report: dict) -> str:
        return (f"FLOPs of the {report['curve']['scope']} ({self.max_frames}×{self.height}×{self.width}): original "
                f"{report['original_total_flops'] / 1e12:.3f} TFLOPs → converted "
                f"{report['converted_total_flops'] / 1e12:.3f} TFLOPs")

    def card_facts(self, config: dict, flops: dict) -> CardFacts:
        recipe, v = self.recipe, flops["video"]
        teacher_class = "PyramidDiffusionMMDiT" if recipe.variant == "sd3" else "PyramidFluxTransformer"
        return CardFacts(
            model=(f"PyramidFlow {recipe.variant} {recipe.resolution}, {self.n_double} double-stream + "
                   f"{self.n_single} single-stream blocks,\n  {config['num_attention_heads']} heads × "
                   f"{config['attention_head_dim']}"),
            inputs_of=f"`{teacher_class}`", load_note=" (the release's folder layout)",
            layers_note=(f" (MM-DiM in place of the attention; double-stream / joint\n  blocks, layers below "
                         f"{self.n_double}, get an MM-DiM with its own text projections)"),
            teacher_sampler="the release's pyramid sampler, no guidance", batch_note="; pyramid-shaped batches",
            fine_tune="the release's pyramidal flow matching on `--data`",
            flops=(f"See `flops.md` / `flops.json`: {flops['curve']['scope'].split(' at ')[0]} at the last unit of a "
                   f"{v['frames']}-frame\n{v['height']}×{v['width']} video: original "
                   f"{flops['original_total_flops'] / 1e12:.3f} TFLOPs, converted "
                   f"{flops['converted_total_flops'] / 1e12:.3f} TFLOPs."),
        )


def check_flags(flags, recipe) -> None:
    """PyramidFlow's own refusals of a conversion's flags and recipe, before any weight is read
    (registry entry ``pyramidflow``)."""
    from .calibration import NUM_STAGES

    if recipe.mmdim.get("registers", True) and int(recipe.mmdim.get("num_registers", 1)) < NUM_STAGES:
        raise M4VError(f"recipe {recipe.name!r}: mmdim.num_registers must be >= {NUM_STAGES} (one register per "
                       "pyramid stage; a frame's register is its pyramid level)")
    # auto: float32 weights, so untouched weights are saved exactly as released (fp32 on disk) and the
    # trained MM-DiM parameters keep fp32 master values; on CUDA the passes run under bf16 autocast
    # (--mixed-precision auto), the precision the release runs in. --dtype bfloat16 halves memory but
    # stores and trains everything in bf16.
    if flags.dtype in ("float16", "fp16"):
        raise M4VError("--dtype float16: PyramidFlow's activations overflow float16; use bfloat16 or float32")
    for flag, folder in (("--calib", flags.calib), ("--data", flags.data)):
        if folder is not None and not Path(folder).expanduser().is_dir():
            raise M4VError(f"{flag} {folder}: not a folder")


def check_layer_selection(layers: list[int], num_double: int, variant: str, allow_double_stream: bool,
                          num_single: int | None = None, source: str = "--layers") -> None:
    """Refuse double-stream layers, with the reason, unless the recipe allows them.

    ``source`` names where the layer list came from (``--layers`` or the recipe's default).
    """
    double = [i for i in layers if i < num_double]
    if not double or allow_double_stream:
        return
    if variant == "sd3":
        where = f"SD3 has only joint (double-stream) blocks, transformer_blocks.0-{num_double - 1}"
    else:
        where = f"layers {_ranges(double)} are double-stream blocks (transformer_blocks.0-{num_double - 1})"
    last = f"{num_double + num_single - 1}" if num_single else "..."
    tail = ("; the SD3 variant has nothing else: use the recipe pyramidflow-sd3-768p, which allows them"
            if variant == "sd3" else f"; convert the single-stream blocks (--layers {num_double}-{last}), or use a "
            "recipe with allow_double_stream: true to convert these too")
    raise M4VError(
        f"{source}: {where}, and this recipe does not allow converting them (allow_double_stream: false). "
        "M4V converts single-stream attention only and keeps the double-stream blocks, whose separate text and "
        f"video weights an MM-DiM can take over only with its own text projections (text_projections){tail}"
    )


def _layer_source(opts_layers, recipe) -> str:
    return "--layers" if opts_layers else f"recipe {recipe.name} (default_layers: {recipe.default_layers})"


def _block_counts(config: dict, variant: str) -> tuple[int, int]:
    return int(config.get("num_layers", 0)), (0 if variant == "sd3" else int(config.get("num_single_layers", 0)))


def _check_layers_before_loading(opts, recipe) -> None:
    """Refuse a bad ``--layers`` from the checkpoint's config.json, before reading any weight.

    Anything unexpected about the folder is left to the loader, which says what is wrong.
    """
    from .loader import CLASS_NAMES, _read_config, _resolve_folder

    try:
        config = _read_config(_resolve_folder(Path(opts.checkpoint), recipe.resolution))
    except M4VError:
        return
    if CLASS_NAMES.get(config.get("_class_name")) != recipe.variant:
        return
    n_double, n_single = _block_counts(config, recipe.variant)
    layers = parse_layers(recipe.layers_or_default(opts.layers), n_double + n_single)
    check_layer_selection(layers, n_double, recipe.variant, recipe.allow_double_stream, n_single,
                          _layer_source(opts.layers, recipe))


def published_flops(recipe, config: dict, model: str, size: tuple[int, int] | None, frames: int | None,
                    layers: str | None, crosscheck: bool) -> tuple[dict, str]:
    """``m4v-convert flops`` for a published PyramidFlow config (registry entry ``pyramidflow``);
    defaults: the recipe's resolution and the release's maximum frames."""
    from .flops import RESOLUTIONS, markdown_report, pyramidflow_flops_report

    height, width, max_frames = RESOLUTIONS[recipe.resolution]
    if size is not None:
        height, width = size
    n_double = int(config.get("num_layers", 8))
    n_single = 0 if recipe.variant == "sd3" else int(config.get("num_single_layers", 16))
    chosen = parse_layers(recipe.layers_or_default(layers), n_double + n_single)
    check_layer_selection(chosen, n_double, recipe.variant, recipe.allow_double_stream, n_single,
                          _layer_source(layers, recipe))
    try:
        report = pyramidflow_flops_report(config, frames or max_frames, height, width,
                                          text_len=int(recipe.video.get("text_len", 128)), converted_layers=chosen,
                                          mmdim=recipe.mmdim, name=recipe.name, crosscheck=crosscheck)
    except ValueError as e:
        raise M4VError(str(e)) from None
    return report, markdown_report(report)
