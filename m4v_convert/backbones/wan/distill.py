"""What distillation needs to know about Wan2.1 beyond the converted model class (``wan.py``).

Its batches (clean latents noised by rectified flow), which module outputs are the per-layer
features, which linear layers LoRA adapts and how many video tokens a batch has. The PyramidFlow counterpart is
``pyramidflow/distill.py``; :func:`m4v_convert.distill.job.run_distillation` runs either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel, record_teacher_layers
from m4v_convert.distill.calibration import CalibSpec, check_uniform, folder_samples, noised_batch
from m4v_convert.distill.stage1 import calibrate_output_norms

# peft matches ``target_modules`` (a string) with re.fullmatch against each module's qualified name
LORA_TARGETS = r"blocks\.\d+\.(attn2\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.(0\.proj|2))"


@dataclass
class WanDistillAdapter:
    layers: list[int]
    patch_size: tuple[int, int, int]
    spec: CalibSpec | None = None

    lora_targets: str = LORA_TARGETS
    prompts: list | None = None  # --prompts: [(prompt, negative prompt)], sampled through ``pipeline``
    videos: list | None = None  # --videos: [(video file, caption)], encoded through ``pipeline``
    pipeline: Path | None = None
    sample_shape: tuple | None = None  # ((height, width), frames) of the --prompts / --videos samples

    # ---- data: clean latents + text embeddings, noised by rectified flow (distill/calibration.py)
    def calibration_samples(self, recipe, opts, teacher, plan, dist, con, device, dtype):
        from m4v_convert.distill.job import calibration_samples, teacher_calib_cache

        if self.prompts is not None or self.videos is not None:
            from m4v_convert.backbones.wan.prompts import WAN_PIPELINE
            from m4v_convert.distill.pipeline_samples import calibration_from_prompts

            size, frames = self.sample_shape
            cfg = teacher.config
            if self.videos is not None and not next(teacher.parameters()).is_meta:
                from m4v_convert.backbones.wan.videos import video_samples

                samples = video_samples(self.pipeline, self.videos, size=size, frames=frames,
                                        cache=teacher_calib_cache(opts, plan), con=con, device=device, dtype=dtype)
                label = f"videos:{Path(opts.videos).resolve()}"
            else:  # --prompts, or the memory plan's stand-ins of the same shapes for either
                samples, label = calibration_from_prompts(
                    WAN_PIPELINE, self.pipeline, self.prompts or self.videos, teacher, opts, plan, size=size,
                    frames=frames, in_channels=cfg["in_channels"], text_dim=cfg["text_dim"], con=con, device=device,
                    dtype=dtype)
            check_uniform(samples, "--videos" if self.videos is not None else "--prompts", self.patch_size)
            return samples, label

        return calibration_samples(recipe, opts, self.spec, teacher, plan, dist, con, device, dtype, self.patch_size)

    def data_samples(self, folder: Path) -> list:
        data = folder_samples(folder, self.spec, flag="--data")
        check_uniform(data, "--data", self.patch_size)
        return data

    def batch(self, samples: list, generator: torch.Generator, device, dtype, with_target: bool = False):
        return noised_batch(samples, self.spec, generator, device, dtype, with_target=with_target)

    def rollout(self, model: nn.Module, batch: dict, noise: torch.Tensor, k: int, steps: int) -> dict:
        """``batch`` with its video replaced by ``model``'s own sampling state after ``k`` of ``steps``
        flow-match Euler steps from ``noise`` (the calibration's flow shift, ``batch``'s text), and
        its timestep by that state's (stage 2's on-policy inputs: ``distill.job.on_policy_batch``)."""
        from m4v_convert.synthetic import euler_sample, sample_sigmas

        x = batch["hidden_states"]
        text = batch["encoder_hidden_states"]
        state = euler_sample(model, noise, text, steps=steps, shift=self.spec.flow_shift, stop=k)
        sigma = float(sample_sigmas(steps, self.spec.flow_shift)[k])
        return {**batch, "hidden_states": state.to(x.dtype),
                "timestep": torch.full_like(batch["timestep"], sigma * 1000.0)}

    def shard(self, batch, rows: slice, device, dtype, with_target: bool = False):
        kwargs, target = batch if with_target else (batch, None)
        kwargs = {k: v[rows].to(device=device, dtype=dtype) for k, v in kwargs.items()}
        return (kwargs, target[rows].to(device)) if with_target else kwargs

    def record(self, teacher: nn.Module, batch: dict, layers: list[int] | None = None) -> dict:
        return record_teacher_layers(teacher, batch, self.layers if layers is None else layers)

    def mmdim_blocks(self, student: M4VWanTransformer3DModel) -> dict[int, nn.Module]:
        return {i: student.blocks[i].attn1.mmdim for i in self.layers}

    def feature_modules(self, model: nn.Module) -> dict[int, nn.Module]:
        """Converted layers' ``attn1`` (MM-DiM in the student, attention in the teacher)."""
        return {i: model.blocks[i].attn1 for i in self.layers}

    def calibrate_output_norms(self, blocks: dict[int, nn.Module], records: dict) -> None:
        calibrate_output_norms(blocks, records)

    def predictor(self, model: nn.Module) -> nn.Module:
        return model  # diffusers' (prediction,) output as is

    def identity(self, config: dict) -> dict:
        return {k: config.get(k) for k in ("num_layers", "num_attention_heads", "attention_head_dim",
                                           "in_channels", "text_dim", "ffn_dim")}

    def enable_gradient_checkpointing(self, student: M4VWanTransformer3DModel) -> None:
        student.enable_gradient_checkpointing()  # keeps the converted attn1's call context (models/converted.py)

    def tokens_per_sample(self, latent_shape) -> int:
        f, h, w = latent_shape[-3:]
        pt, ph, pw = self.patch_size
        return (f // pt) * (h // ph) * (w // pw)

    def count(self, batch: dict) -> tuple[int, int]:
        x = batch["hidden_states"]
        return int(x.shape[0]), int(x.shape[0]) * self.tokens_per_sample(x.shape)
