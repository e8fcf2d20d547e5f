"""What the shared distillation job (:func:`m4v_convert.distill.job.run_distillation`) needs to
know about PyramidFlow: its pyramid-shaped batches (every stage in one call, noised the release's
way), the stage-1 targets (the converted attention run over every stage of a recorded call), the
per-head output-scale calibration over all stages, predictions flattened over stages (stages 2
and 3 compare and regress them), the LoRA targets and gradient checkpointing.

So a PyramidFlow conversion gets everything the Wan one has — resumable checkpoints, ``--stages``,
``--train mmdim|all|lora``, bf16 autocast on GPU, the NaN guard, the log — and stage 3: the
release's pyramidal flow-matching objective on ``--data`` latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .calibration import (PyramidCalibSpec, folder_pyramid_samples, pyramid_batch, shard_pyramid_batch,
                          synthetic_pyramid_samples)
from .converted import FlatPrediction, Stage1Target, calibrate_output_norms, record_teacher_layers
from .layout import LATENT_PATCH

# peft matches ``target_modules`` with re.fullmatch: the MLPs of every block (single-stream:
# proj_mlp and the MLP columns of proj_out; double-stream / joint: both streams' feed-forwards)
LORA_TARGETS = (r"(single_transformer_blocks\.\d+\.(proj_mlp|proj_out)"
                r"|transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2))")


@dataclass
class PyramidDistillAdapter:
    layers: list[int]
    spec: PyramidCalibSpec
    lora_targets: str = LORA_TARGETS
    _targets: dict[int, Stage1Target] = field(default_factory=dict, repr=False)

    # ---- data
    def calibration_samples(self, recipe, opts, teacher, plan, dist, con, device, dtype) -> tuple[list, str]:
        """``--calib`` folder; teacher-generated (``--teacher-calib`` / ``--calib-cache``: the release's
        pyramid sampler run on the folder's or synthetic text conditions, cached); else synthetic."""
        n = int(recipe.calib.get("num_samples", 16))
        if opts.teacher_calib or opts.calib_cache is not None:
            return self._teacher_samples(recipe, opts, teacher, plan, dist, con, device, dtype, n)
        if opts.calib is not None:
            samples = folder_pyramid_samples(opts.calib, self.spec)
            con.print(f"calibration: {len(samples)} samples from {opts.calib} (latents "
                      f"{tuple(samples[0].latents.shape)}, all {self.spec.num_stages} pyramid stages per call)")
            return samples, f"folder:{opts.calib}"
        con.print("[yellow]calibration: SYNTHETIC pyramid batches (random latents, T5-like text with padding); "
                  "they carry no video content; pass --calib DIR with real latents (or --teacher-calib)[/]")
        return synthetic_pyramid_samples(self.spec, n, seed=opts.seed), "synthetic"

    def _teacher_samples(self, recipe, opts, teacher, plan, dist, con, device, dtype, n: int) -> tuple[list, str]:
        from m4v_convert.distill.job import teacher_calib_cache, teacher_calib_key
        from m4v_convert.distill.teacher_samples import cached_teacher_samples

        from .sampler import conditions_digest, pyramid_sample_tensors, teacher_calibration_samples

        if opts.calib is not None:
            texts, text_source = folder_pyramid_samples(opts.calib, self.spec), f"folder:{Path(opts.calib).resolve()}"
        else:
            texts, text_source = synthetic_pyramid_samples(self.spec, n, seed=opts.seed), "synthetic"
        cache = teacher_calib_cache(opts, plan)
        key = teacher_calib_key(teacher, opts, plan, self.spec, text_source, conditions_digest(texts))
        steps, spec = plan.teacher_steps, self.spec
        first = plan.teacher_first_frame_steps if plan.teacher_first_frame_steps is not None else steps

        def make():
            con.print(f"calibration: sampling {len(texts)} videos ({spec.latent_frames} latent frames, "
                      f"{spec.latent_height}×{spec.latent_width}) with the teacher's pyramid sampler ({first} Euler "
                      f"steps per stage for the first frame, {steps} for the others, {spec.num_stages} stages, "
                      "no guidance) ...")
            return teacher_calibration_samples(
                teacher, texts, spec, steps, opts.seed, batch_size=int(recipe.calib.get("batch_size", 1)),
                device=device, dtype=dtype, first_frame_steps=first,
                progress=lambda done, total: con.print(f"  teacher samples {done}/{total}"))

        samples, reused = cached_teacher_samples(
            cache, key, spec, make, dist=dist, to_tensors=pyramid_sample_tensors,
            load=lambda folder: folder_pyramid_samples(folder, spec, flag="--calib-cache"))
        con.print(f"calibration: TEACHER-GENERATED videos ({'reused' if reused else 'cached in'} {cache}); text "
                  f"conditions: {text_source}")
        return samples, f"teacher:{text_source}"

    def data_samples(self, folder: Path) -> list:
        return folder_pyramid_samples(folder, self.spec, flag="--data")

    def batch(self, samples: list, generator: torch.Generator, device, dtype, with_target: bool = False):
        return pyramid_batch(samples, self.spec, generator, device, dtype, with_target=with_target)

    def shard(self, batch, rows: slice, device, dtype, with_target: bool = False):
        return shard_pyramid_batch(batch, rows, self.spec.num_stages, device, dtype, with_target=with_target)

    # ---- model
    def record(self, teacher: nn.Module, batch: dict, layers: list[int] | None = None) -> dict:
        return record_teacher_layers(teacher, batch, self.layers if layers is None else layers)

    def mmdim_blocks(self, student: nn.Module) -> dict[int, nn.Module]:
        """Stage-1 targets: each converted attention run over every stage of a recorded call."""
        if not self._targets:
            self._targets = {i: Stage1Target(attn) for i, attn in student.converted_modules().items()}
        return self._targets

    def calibrate_output_norms(self, blocks: dict[int, nn.Module], records: dict) -> None:
        calibrate_output_norms(blocks, records)

    def feature_modules(self, model: nn.Module) -> dict[int, nn.Module]:
        """No per-layer feature term: a single-stream teacher block has no attention output in model
        space (its W_O is fused into ``proj_out``), so stage 2 compares predictions only."""
        return {}

    def predictor(self, model: nn.Module) -> nn.Module:
        return FlatPrediction(model)

    def enable_gradient_checkpointing(self, student: nn.Module) -> None:
        # the converted attention takes its whole context as call arguments, so the model's own
        # block-level checkpointing (``gradient_checkpointing_ratio`` of the blocks) recomputes it as is
        student.gradient_checkpointing = True

    def count(self, batch: dict) -> tuple[int, int]:
        clips = [c for stage in batch["sample"] for c in stage]
        samples = int(clips[0].shape[0])
        tokens = sum(c.shape[2] * c.shape[3] * c.shape[4] for c in clips) // (LATENT_PATCH * LATENT_PATCH)
        return samples, samples * int(tokens)

    def identity(self, config: dict) -> dict:
        return {k: config.get(k) for k in ("num_layers", "num_single_layers", "num_attention_heads",
                                           "attention_head_dim", "in_channels", "joint_attention_dim")}
