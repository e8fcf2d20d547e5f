"""Wan2.1's side of the conversion job (:class:`m4v_convert.jobs.convert.Conversion`): any layout
of a Wan2.1 checkpoint in, every chosen ``blocks.i.attn1`` converted, the whole-model FLOPs report
(with its FlopCounterMode cross-check and the curve against frames) out."""

from __future__ import annotations

from pathlib import Path

import torch

from m4v_convert.convert import layer_ranges, parse_layers
from m4v_convert.errors import M4VError
from m4v_convert.io.model_card import CardFacts
from m4v_convert.io.pipeline import pipeline_root

REPORT_SIZE = (480, 832)  # the Wan2.1 release's video, for the FLOPs report
REPORT_FRAMES = 81


def check_flags(flags, recipe) -> None:
    """Wan's own refusals of a conversion's flags, before any weight is read (registry entry ``wan``)."""
    if flags.dtype in ("float16", "fp16"):  # it used to end in an unexplained NaN loss
        raise M4VError("--dtype float16: Wan2.1's activations and the distillation's losses overflow float16 (the "
                       "loss turns NaN); use bfloat16 (less memory) or float32 / auto")


class WanConversion:
    transformer_folder = None
    pipeline = None
    prompts = None  # [(prompt, negative prompt)] of --prompts
    videos = None  # [(video file, caption)] of --videos
    distill_scope = ""

    def __init__(self, plan):
        self.plan = plan
        flags = plan.flags
        self.height, self.width = REPORT_SIZE if flags.report_size is None else flags.report_size
        self.frames = REPORT_FRAMES if flags.report_frames is None else flags.report_frames

    def check_before_loading(self) -> None:
        """The checkpoint located and checked from its config and tensor headers; ``--layers`` and
        the FLOPs report's video size checked against that config."""
        from m4v_convert.backbones.wan.flops import check_report_size
        from m4v_convert.backbones.wan.load import find_wan_checkpoint

        self.checkpoint = find_wan_checkpoint(self.plan.flags.checkpoint)
        # a diffusers pipeline folder in: the same pipeline out, with the converted transformer/
        self.pipeline = pipeline_root(self.checkpoint.root, self.checkpoint.subfolder)
        self.transformer_folder = self.checkpoint.subfolder if self.pipeline else None
        flags = self.plan.flags
        if flags.prompts is not None:
            from m4v_convert.backbones.wan.prompts import WAN_PIPELINE
            from m4v_convert.distill.pipeline_samples import check_prompt_flags, check_sample_count

            self.prompts = check_prompt_flags(flags, self.pipeline, WAN_PIPELINE)
            check_sample_count(len(self.prompts), self.plan.recipe, f"--prompts {flags.prompts}", "prompt(s)")
        if flags.videos is not None:
            from m4v_convert.backbones.wan.videos import check_video_flags
            from m4v_convert.distill.pipeline_samples import check_sample_count

            self.videos = check_video_flags(flags, self.pipeline)
            check_sample_count(len(self.videos), self.plan.recipe, f"--videos {flags.videos}", "captioned video(s)")
            self._check_video_cache()
        if flags.teacher_steps is not None and not (flags.prompts or flags.teacher_calib or flags.calib_cache):
            raise M4VError("--teacher-steps: the steps of the teacher's samples; give --prompts FILE or --teacher-calib")
        if flags.prompts is None and flags.guidance_scale is not None:
            raise M4VError("--guidance-scale: the guidance of the teacher's samples of --prompts; give --prompts FILE")
        if flags.prompts is None and flags.videos is None and (flags.calib_size or flags.calib_frames):
            raise M4VError("--calib-size / --calib-frames: they size the samples of --prompts or --videos; give "
                           "--prompts FILE or --videos DIR")
        parse_layers(self.plan.layer_spec, self.checkpoint.config["num_layers"])
        check_report_size(self.checkpoint.config, self.frames, self.height, self.width)

    def sample_shape(self) -> tuple[tuple[int, int], int]:
        from m4v_convert.distill.pipeline_samples import default_sample_shape

        return default_sample_shape(self.plan.flags, self.plan.recipe)

    def _check_video_cache(self) -> None:
        """A --calib-cache of other clips is refused now (its key needs no weights)."""
        from m4v_convert.backbones.wan.videos import cache_key
        from m4v_convert.distill.job import teacher_calib_cache
        from m4v_convert.distill.sample_cache import check_cache

        size, frames = self.sample_shape()
        check_cache(teacher_calib_cache(self.plan.flags, self.plan.distill),
                    cache_key(self.pipeline, self.videos, size, frames, self.plan.dtype), "video clips")

    def load_teacher(self):
        from m4v_convert.backbones.wan.load import load_wan_transformer

        return load_wan_transformer(self.checkpoint, dtype=self.plan.dtype, device=self.plan.device)

    def load_read_bytes(self) -> int:
        """What loading holds of the checkpoint beside the model's copy: one weight file at a time for a
        diffusers folder (``load._own_cpu_tensors``), the whole state dict for the original layouts."""
        sizes = [f.stat().st_size for f in self.checkpoint.weight_files]
        return max(sizes) if self.checkpoint.use_from_pretrained else sum(sizes)

    def meta_teacher(self):
        """The teacher built from the checkpoint's config on the meta device (for the memory plan)."""
        from m4v_convert.backbones.wan.load import _wan_cls

        with torch.device("meta"):
            model = _wan_cls()(**self.checkpoint.config)
        return model.eval()

    def sharded_loading_refused(self) -> str | None:
        """Why ``--fsdp`` loads the whole teacher before sharding it (None: :meth:`load_sharded` applies)."""
        f = self.plan.flags
        if f.teacher_calib or f.calib_cache is not None or f.prompts is not None or f.videos is not None:
            return ("the teacher makes the calibration samples (--teacher-calib, --calib-cache, --prompts, --videos) "
                    "in one process, before it is sharded")
        return None

    def load_sharded(self, layers: list[int], sharder):
        """(teacher, student) read block by block and sharded as they are read (``--fsdp``): each
        teacher block is read, the student's block set to share it and its layer converted, then the
        pair goes to ``sharder`` (:class:`~m4v_convert.distill.sharding.BlockSharder`) before the next
        block is read, so one process never holds more than its shards and one whole block. The same
        weights as :meth:`load_teacher` + :meth:`make_student` (tests/test_fsdp.py): the layers are
        converted in the same order, drawing the same random numbers."""
        from m4v_convert.backbones.wan.load import empty_wan_transformer, load_wan_part_
        from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel

        ckpt, dtype, device = self.checkpoint, self.plan.dtype, self.plan.device
        with torch.random.fork_rng(devices=[]):  # the layers' init draws what it would draw after a whole load
            teacher = empty_wan_transformer(ckpt)
        for module in teacher.modules():  # the rope tables, which no checkpoint holds
            module._buffers.update({k: b.to(device) for k, b in module._buffers.items() if b is not None})
        load_wan_part_(teacher, ckpt, None, dtype=dtype, device=device)  # what precedes and follows the blocks
        teacher.eval().requires_grad_(False)
        student = M4VWanTransformer3DModel.from_teacher(teacher)
        student.requires_grad_(False)
        mmdim = self.plan.recipe.mmdim
        for i, (t, s) in enumerate(zip(teacher.blocks, student.blocks)):
            load_wan_part_(teacher, ckpt, i, dtype=dtype, device=device)
            t.requires_grad_(False)
            student.share_weights_(s, t)
            if i in layers:
                student.convert_([i], mmdim)
                s.requires_grad_(False)
            sharder.block(t, s, [s.attn1.mmdim] if i in layers else [])
        return teacher, student

    def select_layers(self, teacher) -> list[int]:
        return parse_layers(self.plan.layer_spec, teacher.config["num_layers"])

    def loaded_line(self, teacher, layers: list[int]) -> str:
        cfg = teacher.config
        return (f"loaded WanTransformer3DModel: {cfg['num_layers']} layers, {cfg['num_attention_heads']} heads × "
                f"{cfg['attention_head_dim']}, {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M params; "
                f"converting layers {layer_ranges(layers)}")

    def make_student(self, teacher, layers: list[int]):
        from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel

        student = M4VWanTransformer3DModel.from_teacher(teacher)
        student.convert_(layers, self.plan.recipe.mmdim)
        return student

    def distill_adapter(self, teacher, student, layers: list[int]):
        from m4v_convert.backbones.wan.distill import WanDistillAdapter
        from m4v_convert.distill.calibration import CalibSpec

        cfg, c = teacher.config, self.plan.recipe.calib
        spec = CalibSpec(in_channels=cfg["in_channels"], text_dim=cfg["text_dim"], latent_frames=c["latent_frames"],
                         latent_height=c["latent_height"], latent_width=c["latent_width"], text_len=c["text_len"],
                         flow_shift=float(c.get("flow_shift", 1.0)))
        return WanDistillAdapter(layers=layers, patch_size=tuple(cfg["patch_size"]), spec=spec, prompts=self.prompts,
                                 videos=self.videos, pipeline=self.pipeline, sample_shape=self.sample_shape())

    def flops_report(self, config: dict, layers: list[int]) -> dict:
        from m4v_convert.backbones.wan.flops import build_wan_flops_report

        recipe = self.plan.recipe
        return build_wan_flops_report(config, self.frames, self.height, self.width,
                                      text_len=int(recipe.video.get("text_len", 512)), converted_layers=layers,
                                      mmdim_config=recipe.mmdim,
                                      name=f"{recipe.name} ({Path(self.plan.flags.checkpoint).name})")

    def flops_ratio(self, config: dict, layers: list[int]) -> float:
        """Converted / original FLOPs with ``layers`` converted, as the report counts them (no cross-check,
        no curve: ``--layers auto`` asks once per candidate)."""
        from m4v_convert.backbones.wan.flops import mmdim_config_fn_from, wan_config, wan_model_flops

        cfg, recipe = wan_config(config), self.plan.recipe
        r = wan_model_flops(cfg, self.frames, self.height, self.width, int(recipe.video.get("text_len", 512)), layers,
                            mmdim_config_fn_from(cfg, recipe.mmdim))
        return r["converted_total_flops"] / r["original_total_flops"]

    def write_flops(self, report: dict, folder: Path) -> None:
        from m4v_convert.flops.report import write_flops_report

        write_flops_report(report, folder)

    def flops_line(self, report: dict) -> str:
        return (f"FLOPs at {self.frames}×{self.height}×{self.width}: original "
                f"{report['original_total_flops'] / 1e12:.3f} TFLOPs → converted "
                f"{report['converted_total_flops'] / 1e12:.3f} TFLOPs")

    def card_facts(self, config: dict, flops: dict) -> CardFacts:
        return CardFacts(
            model=(f"WanTransformer3DModel, {config['num_layers']} layers, {config['num_attention_heads']} heads × "
                   f"{config['attention_head_dim']}"),
            inputs_of="`WanTransformer3DModel`", load_note=" and drops into `diffusers.WanPipeline(transformer=...)`",
            layers_note=" (self-attention)",
            flops=(f"See `flops.md` / `flops.json` / `flops.png`: original {flops['original_total_flops'] / 1e12:.3f} "
                   f"TFLOPs, converted {flops['converted_total_flops'] / 1e12:.3f} TFLOPs per forward at "
                   f"{self.frames}×{self.height}×{self.width}."),
        )
