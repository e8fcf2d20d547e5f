"""What distillation needs to know about Wan2.1 beyond the converted model class (``wan.py``).

Which module outputs are the per-layer features, which linear layers LoRA adapts, how many video
tokens a batch has, and gradient checkpointing that keeps the converted ``attn1``'s call context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from m4v_convert.backbones.wan import M4VWanTransformer3DModel, record_teacher_layers

# peft matches ``target_modules`` (a string) with re.fullmatch against each module's qualified name
LORA_TARGETS = r"blocks\.\d+\.(attn2\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.(0\.proj|2))"


def _checkpoint_keeping_context(ctx):
    """diffusers' block-level gradient checkpointing, with the converted attention's call context
    (frame grid, text) captured at forward time and put back while the block is recomputed in
    backward (the model's forward clears it on return)."""

    def checkpointed(block, *args):
        saved = (ctx.layout, ctx.text, ctx.text_mask)

        def run(*a):
            current = (ctx.layout, ctx.text, ctx.text_mask)
            ctx.layout, ctx.text, ctx.text_mask = saved
            try:
                return block(*a)
            finally:
                ctx.layout, ctx.text, ctx.text_mask = current

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    return checkpointed


@dataclass
class WanDistillAdapter:
    layers: list[int]
    patch_size: tuple[int, int, int]

    lora_targets: str = LORA_TARGETS

    def record(self, teacher: nn.Module, batch: dict) -> dict:
        return record_teacher_layers(teacher, batch, self.layers)

    def mmdim_blocks(self, student: M4VWanTransformer3DModel) -> dict[int, nn.Module]:
        return {i: student.blocks[i].attn1.mmdim for i in self.layers}

    def feature_modules(self, model: nn.Module) -> dict[int, nn.Module]:
        """Converted layers' ``attn1`` (MM-DiM in the student, attention in the teacher)."""
        return {i: model.blocks[i].attn1 for i in self.layers}

    def enable_gradient_checkpointing(self, student: M4VWanTransformer3DModel) -> None:
        student.enable_gradient_checkpointing(_checkpoint_keeping_context(student._m4v_context))

    def tokens_per_sample(self, latent_shape) -> int:
        f, h, w = latent_shape[-3:]
        pt, ph, pw = self.patch_size
        return (f // pt) * (h // ph) * (w // pw)

    def count(self, batch: dict) -> tuple[int, int]:
        x = batch["hidden_states"]
        return int(x.shape[0]), int(x.shape[0]) * self.tokens_per_sample(x.shape)
