"""What the shared distillation job (:func:`m4v_convert.distill.job.run_distillation`) needs to
know about a ``backbone: generic`` recipe: calibration batches mapped onto the model's forward by
the recipe's ``grid`` / ``inputs`` sections, the teacher's per-layer records, the MM-DiM blocks and
the per-layer feature modules (a fused out projection's output where the recipe fuses it).

Stage 3 (fine-tune on ``--data``) is not offered: its target depends on the backbone's prediction
type (v-prediction DDPM for CogVideoX, flow matching for LTX-Video / HunyuanVideo) and on how the
recipe lays the latents out, which a recipe does not describe yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from m4v_convert.backbones.generic import model as G
from m4v_convert.distill.calibration import CalibSpec, check_uniform, folder_samples, noised_batch, synthetic_samples
from m4v_convert.distill.stage1 import calibrate_output_norms
from m4v_convert.errors import M4VError

FINE_TUNE_UNSUPPORTED = ("generic backbones: the fine-tune objective depends on the backbone's prediction type; "
                         "not implemented")


@dataclass
class GenericDistillAdapter:
    recipe: object  # m4v_convert.recipes.Recipe
    config: dict
    infos: list  # teacher-side LayerInfo of the selected layers
    spec: CalibSpec
    num_samples: int = 8
    exact_text_len: int | None = None  # recipe inputs.text_len: the model takes exactly this many text tokens
    prompts: list | None = None  # --prompts: [(prompt, negative prompt)], sampled through ``pipeline``
    pipeline: Path | None = None
    prompt_pipeline: object = None  # distill.pipeline_samples.PromptPipeline of the recipe's pipeline: section
    sample_shape: tuple | None = None  # ((height, width), frames) of the prompt samples

    fine_tune_unsupported: str = FINE_TUNE_UNSUPPORTED
    lora_targets: str | None = None  # --train lora: not offered (no recipe field names the MLPs)

    @property
    def layers(self) -> list[int]:
        return [info.index for info in self.infos]

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return G.patch_sizes(self.recipe.spec, self.config)

    # ---- data
    def calibration_samples(self, recipe, opts, teacher, plan, dist, con, device, dtype):
        if self.prompts is not None:
            from m4v_convert.distill.pipeline_samples import calibration_from_prompts

            size, frames = self.sample_shape
            samples, label = calibration_from_prompts(
                self.prompt_pipeline, self.pipeline, self.prompts, teacher, opts, plan, size=size, frames=frames,
                in_channels=self.spec.in_channels, text_dim=self.spec.text_dim, con=con, device=device, dtype=dtype)
        elif opts.calib is not None:
            samples, label = folder_samples(opts.calib, self.spec), f"folder:{opts.calib}"
            wrong = sorted({int(s.text.shape[0]) for s in samples} - {self.exact_text_len or 0})
            if self.exact_text_len and wrong:
                raise M4VError(f"--calib {opts.calib}: text_embeds of {wrong[0]} tokens; this model takes exactly "
                               f"{self.exact_text_len} (recipe inputs.text_len: the pipeline pads every prompt to it)")
        else:
            samples, label = synthetic_samples(self.spec, self.num_samples, seed=opts.seed), "synthetic"
            con.print("[yellow]calibration: SYNTHETIC batches (random latents and text embeddings)[/]")
        check_uniform(samples, "calibration", self.patch_size)
        return samples, label

    def data_samples(self, folder):
        raise NotImplementedError(self.fine_tune_unsupported)

    def batch(self, samples: list, generator: torch.Generator, device, dtype, with_target: bool = False):
        if with_target:
            raise NotImplementedError(self.fine_tune_unsupported)
        return G.model_inputs(noised_batch(samples, self.spec, generator, device, dtype), self.recipe.spec,
                              self.config)

    def shard(self, batch: dict, rows: slice, device, dtype, with_target: bool = False) -> dict:
        out = {}
        for k, v in batch.items():  # grid sizes (BNC layouts) are plain ints
            if isinstance(v, torch.Tensor):
                v = v[rows].to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
            out[k] = v
        return out

    # ---- model
    def record(self, teacher: nn.Module, batch: dict, layers: list[int] | None = None) -> dict:
        infos = self.infos if layers is None else [info for info in self.infos if info.index in layers]
        return G.record_teacher_layers(teacher, batch, infos)

    def mmdim_blocks(self, student: nn.Module) -> dict[int, nn.Module]:
        return {info.index: student.get_submodule(info.fqn).mmdim for info in self.infos}

    def calibrate_output_norms(self, blocks: dict[int, nn.Module], records: dict) -> None:
        calibrate_output_norms(blocks, records)

    def feature_modules(self, model: nn.Module) -> dict[int, nn.Module]:
        """The converted layer's output; for a fused out projection, the fused projection's (same width)."""
        return {info.index: model.get_submodule(info.out[0] if info.fused_out else info.fqn) for info in self.infos}

    def predictor(self, model: nn.Module) -> nn.Module:
        return model

    def enable_gradient_checkpointing(self, student: nn.Module) -> None:
        raise NotImplementedError("--grad-checkpointing is not offered for generic recipes")

    def count(self, batch: dict) -> tuple[int, int]:
        x = batch[self.recipe.spec.grid.input]
        return int(x.shape[0]), 0

    def identity(self, config: dict) -> dict:
        return {"class": self.recipe.spec.model.class_name,
                **{k: config.get(k) for k in ("num_layers", "num_attention_heads", "attention_head_dim",
                                              "in_channels")}}
