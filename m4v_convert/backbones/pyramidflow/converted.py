"""PyramidFlow miniFLUX → M4V hybrid: the single-stream blocks' attention becomes MM-DiM.

As in the M4V paper, the 8 double-stream blocks (``transformer_blocks.{i}``) stay and the 16
single-stream blocks (``single_transformer_blocks.{j}``) get one MM-DiM each, whose parameters
are shared by text and video (a single-stream block already shares them). Layers are numbered
globally, double-stream first: block ``i`` of ``--layers`` is ``transformer_blocks.{i}`` for
``i < num_layers`` and ``single_transformer_blocks.{i - num_layers}`` after (``8-23`` at full size).

**Out projection (the one structural choice).** A single-stream block has no attention
out-projection: its ``proj_out`` (``d × (d + mlp)``) maps ``[attn ; mlp]`` to ``d``, so W_O is
the first ``d`` columns. Two exact ways to put an MM-DiM (which ends with its own
``mixer.out_proj``) in that slot:

* keep ``proj_out`` whole and make ``mixer.out_proj`` the identity: one more ``d × d`` matmul
  over the ``N'`` SSM tokens of every block (+25% on the projections) and a redundant trainable
  ``d × d`` matrix in series with W_O;
* **(taken)** ``mixer.out_proj`` = W_O (the attention columns of ``proj_out``, no bias) and
  ``proj_out`` cut to its MLP columns (``d × mlp``, keeping the whole bias). The block computes
  ``gate · (mixer_out + W_mlp·m + b)``, which equals the teacher's ``gate · (W·[y ; m] + b)``
  exactly (one matmul split in two: equal up to float rounding), costs nothing extra, and the
  out projection trains with the mixer as in Mamba2. In a converted checkpoint
  ``single_transformer_blocks.{j}.proj_out.weight`` is therefore ``(d, mlp)``.

The swap is :func:`m4v_convert.convert.mambafy_` on ``single_transformer_blocks.{j}``: the block
is replaced (its ``proj_out`` changes shape), its ``norm``/``proj_mlp``/``act_mlp`` are kept, and
its ``attn`` becomes a :class:`PyramidMMDiMAttention`.

**Context of each call** (what PyramidFlow's attention call supplies, and how MM-DiM uses it):

* *Text sandwich*: the block's sequence is ``[text (Lz) ; video]``; text validity is the T5
  mask of the stage (``StageLayout.text_mask``). Padded T5 tokens get a zero output (in the
  teacher they only see each other and are never read by valid tokens).
* *Registers*: one per pyramid stage (``num_registers: 3``); every frame's register is its
  clip's pyramid level (history clips at a lower resolution use the lower level's register).
  Levels are known when a call holds all stages (training, calibration) or when its grids
  match the top-level token grid recorded in ``config["m4v"]["full_grid"]`` (the recipe's
  resolution). A call that matches neither (one stage at another frame size) cannot name its
  level; then register 0 is used for every frame.
* *Zigzag*: path ``layer_index mod 8`` with the global layer index (equal to the single-block
  index mod 8 at full size, since there are 8 double blocks).
* *Temporal branch*: fed by the conditional history frames only (``temporal_sources``), causal
  over frames, so the noisy frame reads the history and history never reads the noisy frame.
* *RoPE*: with ``mmdim.rotary`` the teacher's (t, h, w) RoPE tables of the video tokens
  (fractional positions for history included) rotate B/C; text and registers are not rotated
  (text sits at position (0, 0, 0) in the teacher: the identity rotation).
* The dense block-causal ``attention_mask`` is not used: MM-DiM is causal by scan order
  (frames oldest → newest, history before the noisy clip) and handles padding by the sandwich.

Init (see :mod:`m4v_convert.layers.init_from_attention`): x/B/C rows of ``in_proj`` from
``attn.to_v/k/q`` (+ biases), ``B_norm``/``C_norm`` from the per-head ``attn.norm_k/q`` weights
(``bc_norm: per_group``), ``out_proj`` from the attention columns of ``proj_out``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
from diffusers.configuration_utils import register_to_config
from diffusers.models.normalization import AdaLayerNormZeroSingle

from m4v_convert.convert import mambafy_, register_handler
from m4v_convert.distill.records import LayerRecord
from m4v_convert.errors import M4VError
from m4v_convert.layers.init_from_attention import AttentionWeights, mmdim_from_attention
from m4v_convert.layers.mmdim import MMDiM, MMDiMConfig
from m4v_convert.layers.recompose import FrameBlock, VideoLayout

from .layout import StageLayout, build_stage_layouts
from .miniflux import PyramidFluxTransformer

SINGLE_BLOCK_PATTERN = re.compile(r"^single_transformer_blocks\.(\d+)$")
MLP_RATIO = 4.0  # FluxSingleTransformerBlock's default, used by PyramidFlow


# ----------------------------------------------------------------------------- call context

def video_layout(layout: StageLayout) -> VideoLayout:
    """The stage's clips as MM-DiM frame blocks; register = pyramid level (0 when unknown)."""
    return VideoLayout(tuple(FrameBlock(b.num_frames, b.height, b.width, b.level if b.level is not None else 0)
                             for b in layout.blocks))


def history_sources(layout: StageLayout, device=None) -> torch.Tensor:
    """``(T,)`` bool over the stage's frames in sequence order: True for conditional history."""
    return torch.tensor([b.is_history for b in layout.blocks for _ in range(b.num_frames)], dtype=torch.bool,
                        device=device)


def video_rotary(image_rotary_emb, text_len: int):
    """The whole-sequence RoPE tables ``(L, head_dim)`` → the video tokens' rows."""
    if image_rotary_emb is None:
        return None
    cos, sin = image_rotary_emb
    return cos[text_len:], sin[text_len:]


class PyramidMMDiMAttention(nn.Module):
    """Stands in ``single_transformer_blocks.{j}.attn``: same call, MM-DiM inside.

    Returns ``(B, L, d)`` already projected to the model width (see the module docstring: the
    mixer's ``out_proj`` holds the block's W_O), text rows first.
    """

    def __init__(self, mmdim: MMDiM):
        super().__init__()
        self.mmdim = mmdim

    @property
    def mixer(self):
        return self.mmdim.mixer

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                token_layout: StageLayout | None = None, **kwargs):
        if token_layout is None:
            raise RuntimeError(
                "PyramidMMDiMAttention needs the stage's token layout; run it inside a PyramidFlow model "
                "(M4VPyramidFluxTransformer), which passes token_layout to every attention call"
            )
        if encoder_hidden_states is not None:
            raise ValueError("PyramidMMDiMAttention replaces single-stream attention: pass [text ; video] as "
                             "hidden_states and no encoder_hidden_states")
        lz = token_layout.text_len
        text, video = hidden_states[:, :lz], hidden_states[:, lz:]
        mask = token_layout.text_mask.to(hidden_states.device)
        video_out, text_out = self.mmdim(
            video, video_layout(token_layout), text if lz else None, mask if lz else None,
            video_rotary(image_rotary_emb, lz), history_sources(token_layout, hidden_states.device),
        )
        return video_out if text_out is None else torch.cat([text_out, video_out], dim=1)


class MMDiMSingleTransformerBlock(nn.Module):
    """``FluxSingleTransformerBlock`` with MM-DiM attention and ``proj_out`` cut to the MLP columns."""

    def __init__(self, dim: int, mlp_hidden_dim: int, mmdim_config: MMDiMConfig, device=None, dtype=None):
        super().__init__()
        if mmdim_config.d_model != dim:
            raise ValueError(f"mmdim d_model {mmdim_config.d_model} != block width {dim}")
        fk = {"device": device, "dtype": dtype}
        self.mlp_hidden_dim = mlp_hidden_dim
        self.norm = AdaLayerNormZeroSingle(dim).to(**fk)
        self.proj_mlp = nn.Linear(dim, mlp_hidden_dim, **fk)
        self.act_mlp = nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(mlp_hidden_dim, dim, **fk)
        self.attn = PyramidMMDiMAttention(MMDiM(mmdim_config, **fk))

    @classmethod
    def from_teacher_block(cls, block: nn.Module, config: MMDiMConfig) -> "MMDiMSingleTransformerBlock":
        """Built from a ``FluxSingleTransformerBlock``: shares its norm/MLP modules (no copy)."""
        dim = block.proj_out.out_features
        mlp = block.mlp_hidden_dim
        w = block.proj_out.weight
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.mlp_hidden_dim = mlp
        new.norm, new.proj_mlp, new.act_mlp = block.norm, block.proj_mlp, block.act_mlp
        new.proj_out = nn.Linear(mlp, dim, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.proj_out.weight.copy_(w[:, dim:])
            new.proj_out.bias.copy_(block.proj_out.bias)
        mmdim = mmdim_from_attention(config, single_block_attention_weights(block), device=w.device, dtype=w.dtype)
        new.attn = PyramidMMDiMAttention(mmdim)
        return new

    @property
    def mmdim(self) -> MMDiM:
        return self.attn.mmdim

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        text_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        residual = hidden_states
        norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
        mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))
        kwargs = {k: v for k, v in (joint_attention_kwargs or {}).items() if k in ("attention_mask", "token_layout")}
        attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **kwargs)
        hidden_states = residual + gate.unsqueeze(1) * (attn_output + self.proj_out(mlp_hidden_states))
        return hidden_states[:, :text_len], hidden_states[:, text_len:]


# ----------------------------------------------------------------------------- the swap

def single_block_attention_weights(block: nn.Module) -> AttentionWeights:
    """Q/K/V (+ biases, per-head q/k RMSNorm) of a single-stream block; W_O = the attention
    columns of its fused ``proj_out`` (the bias stays with the MLP columns)."""
    attn = block.attn
    dim = block.proj_out.out_features
    inner = attn.to_q.out_features
    if inner != dim:
        raise ValueError(f"single-stream attention width {inner} != model width {dim}")

    def norm_weight(norm):
        w = getattr(norm, "weight", None)
        return None if w is None else w.detach()

    return AttentionWeights(
        heads=attn.heads, head_dim=attn.head_dim,
        q_weight=attn.to_q.weight.detach(), k_weight=attn.to_k.weight.detach(), v_weight=attn.to_v.weight.detach(),
        out_weight=block.proj_out.weight.detach()[:, :dim],
        q_bias=None if attn.to_q.bias is None else attn.to_q.bias.detach(),
        k_bias=None if attn.to_k.bias is None else attn.to_k.bias.detach(),
        v_bias=None if attn.to_v.bias is None else attn.to_v.bias.detach(),
        out_bias=None,
        q_norm_weight=norm_weight(attn.norm_q), k_norm_weight=norm_weight(attn.norm_k),
    )


@dataclass
class PyramidSingleBlockToMMDiM:
    """Swap config: recipe ``mmdim`` settings + where the single-stream blocks start (global index)."""

    mmdim: dict = field(default_factory=dict)
    num_double_layers: int = 8

    def block_config(self, block: nn.Module, single_index: int) -> MMDiMConfig:
        attn = block.attn
        return MMDiMConfig(d_model=block.proj_out.out_features, nheads=attn.heads, headdim=attn.head_dim,
                           layer_index=self.num_double_layers + single_index, **self.mmdim)


@register_handler(PyramidSingleBlockToMMDiM)
def _single_block_to_mmdim(block: nn.Module, fqn: str, config: PyramidSingleBlockToMMDiM) -> nn.Module:
    m = SINGLE_BLOCK_PATTERN.match(fqn)
    if m is None:
        raise ValueError(f"{fqn!r} is not a PyramidFlow single-stream block (expected single_transformer_blocks.N)")
    return MMDiMSingleTransformerBlock.from_teacher_block(block, config.block_config(block, int(m.group(1))))


def split_layers(layers: Sequence[int], num_double: int) -> tuple[list[int], list[int]]:
    """Global layer indices → (double-stream indices, single-stream block indices)."""
    double = [i for i in layers if i < num_double]
    single = [i - num_double for i in layers if i >= num_double]
    return double, single


# ----------------------------------------------------------------------------- converted model

class M4VPyramidFluxTransformer(PyramidFluxTransformer):
    """``PyramidFluxTransformer`` with some single-stream blocks converted to MM-DiM.

    Same forward arguments as the teacher. ``m4v`` (saved in ``config.json``) records the
    conversion: toolkit version, recipe, source, ``full_grid`` (top-level token grid used to name
    pyramid levels) and one ``MMDiMConfig`` dict per converted layer, keyed by global layer index.
    """

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        num_layers: int = 8,
        num_single_layers: int = 16,
        attention_head_dim: int = 64,
        num_attention_heads: int = 30,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        axes_dims_rope: Sequence[int] = (16, 24, 24),
        use_flash_attn: bool = False,
        use_temporal_causal: bool = True,
        interp_condition_pos: bool = True,
        use_gradient_checkpointing: bool = False,
        gradient_checkpointing_ratio: float = 0.6,
        m4v: dict | None = None,
    ):
        super().__init__(
            patch_size=patch_size, in_channels=in_channels, num_layers=num_layers,
            num_single_layers=num_single_layers, attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads, joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim, axes_dims_rope=axes_dims_rope,
            use_flash_attn=use_flash_attn, use_temporal_causal=use_temporal_causal,
            interp_condition_pos=interp_condition_pos, use_gradient_checkpointing=use_gradient_checkpointing,
            gradient_checkpointing_ratio=gradient_checkpointing_ratio,
        )
        dim = self.inner_dim
        for key, cfg in sorted((m4v or {}).get("layers", {}).items(), key=lambda kv: int(kv[0])):
            j = int(key) - num_layers
            if not 0 <= j < num_single_layers:
                raise ValueError(f"m4v.layers: layer {key} is not a single-stream block (expected "
                                 f"{num_layers}-{num_layers + num_single_layers - 1})")
            self.single_transformer_blocks[j] = MMDiMSingleTransformerBlock(
                dim, int(dim * MLP_RATIO), MMDiMConfig.from_dict(cfg))

    @classmethod
    def from_teacher(cls, teacher: PyramidFluxTransformer) -> "M4VPyramidFluxTransformer":
        """An independent copy of ``teacher`` with this class (no layer converted yet)."""
        if not isinstance(teacher, PyramidFluxTransformer):
            raise TypeError(f"expected a PyramidFluxTransformer, got {type(teacher).__name__}")
        student = copy.deepcopy(teacher)
        student.__class__ = cls
        student.register_to_config(m4v={"layers": {}})
        return student

    def convert_(self, layers: Sequence[int], mmdim: dict, meta: dict | None = None) -> list[str]:
        """Replace the single-stream blocks of global indices ``layers`` by MM-DiM blocks
        initialized from them. Double-stream indices are refused (not implemented)."""
        n_double = self.config.num_layers
        double, single = split_layers(layers, n_double)
        if double:
            raise M4VError(f"layers {double} are double-stream blocks (transformer_blocks.0-{n_double - 1}); "
                           "converting double-stream blocks is not implemented")
        bad = [j + n_double for j in single if j >= self.config.num_single_layers]
        if bad:
            raise M4VError(f"layers {bad} out of range; this model has layers 0-"
                           f"{n_double + self.config.num_single_layers - 1}")
        wanted = {f"single_transformer_blocks.{j}" for j in single}
        replaced = mambafy_(
            self, PyramidSingleBlockToMMDiM(mmdim=dict(mmdim), num_double_layers=n_double),
            lambda m, fqn: fqn in wanted and not isinstance(m, MMDiMSingleTransformerBlock),
        )
        self._record_conversion(meta or {})
        return replaced

    def _record_conversion(self, meta: dict) -> None:
        n_double = self.config.num_layers
        layers = {str(n_double + j): blk.mmdim.config.to_dict()
                  for j, blk in enumerate(self.single_transformer_blocks)
                  if isinstance(blk, MMDiMSingleTransformerBlock)}
        previous = dict(self.config.get("m4v") or {})
        previous.update(meta)
        previous["layers"] = layers
        self.register_to_config(m4v=previous)

    @property
    def converted_layers(self) -> list[int]:
        n_double = self.config.num_layers
        return [n_double + j for j, blk in enumerate(self.single_transformer_blocks)
                if isinstance(blk, MMDiMSingleTransformerBlock)]

    def token_layouts(self, sample, encoder_attention_mask, *, full_grid=None) -> list[StageLayout]:
        """As the teacher's, but levels are also named from ``m4v.full_grid`` (single-stage calls)."""
        grid = full_grid or (self.config.get("m4v") or {}).get("full_grid")
        if grid is not None:
            layouts = build_stage_layouts(sample, encoder_attention_mask, full_grid=tuple(grid))
            if all(b.level is not None for lay in layouts for b in lay.blocks):
                return layouts
        return build_stage_layouts(sample, encoder_attention_mask)


CONVERTED_CLASSES = {"M4VPyramidFluxTransformer": M4VPyramidFluxTransformer}


# ----------------------------------------------------------------------------- stage-1 records

def _valid_rows(layout: StageLayout, device) -> torch.Tensor:
    """``(B, L)`` bool: valid text and all video tokens (padded T5 rows are False)."""
    mask = layout.text_mask.to(device)
    return torch.cat([mask, mask.new_ones(mask.shape[0], layout.video_len)], dim=1)


@torch.no_grad()
def record_teacher_layers(teacher: PyramidFluxTransformer, batch: dict,
                          layers: Sequence[int]) -> dict[int, LayerRecord]:
    """Run ``teacher`` once on ``batch`` (one model call, several stages) and return, per selected
    global layer index (single-stream only), its attention input and output over all stages.

    ``hidden_states`` is a list over stages of the attention input ``(B, L_s, d)``; ``context``
    is ``{"stages": [{"token_layout", "image_rotary_emb"}, ...]}``; ``output`` is the teacher's
    attention contribution in model space (its output times the attention columns of
    ``proj_out``), padded T5 rows zeroed, concatenated over stages along the token axis;
    ``pre_out`` the teacher's attention output before that projection at the valid rows,
    flattened to ``(rows, d)`` (for the per-head output-scale calibration). Train with
    :class:`Stage1Target`, which gives an MM-DiM the same shape of input and output.
    """
    n_double = teacher.config.num_layers
    _, single = split_layers(layers, n_double)
    seen: dict[int, list] = {j: [] for j in single}

    def tap(j):
        def hook(module, args, kwargs, output):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            seen[j].append((hs.detach(), kwargs.get("token_layout"), kwargs.get("image_rotary_emb"), output.detach()))
        return hook

    handles = [teacher.single_transformer_blocks[j].attn.register_forward_hook(tap(j), with_kwargs=True)
               for j in single]
    try:
        teacher(**batch)
    finally:
        for h in handles:
            h.remove()
    records = {}
    for j in single:
        block = teacher.single_transformer_blocks[j]
        dim = block.proj_out.out_features
        w_o = block.proj_out.weight[:, :dim]
        inputs, contexts, outputs, pre = [], [], [], []
        for hs, layout, rope, out in seen[j]:
            valid = _valid_rows(layout, hs.device)
            inputs.append(hs)
            contexts.append({"token_layout": layout, "image_rotary_emb": rope})
            outputs.append((out @ w_o.t().to(out.dtype)) * valid.unsqueeze(-1).to(out.dtype))
            pre.append(out[valid])
        records[n_double + j] = LayerRecord(inputs, torch.cat(outputs, dim=1), {"stages": contexts},
                                            pre_out=torch.cat(pre, dim=0))
    return records


class Stage1Target(nn.Module):
    """What stage 1 trains for one converted layer: the MM-DiM attention run over every stage of
    a recorded call, outputs concatenated along the token axis (as :func:`record_teacher_layers`
    concatenates the teacher's). Exposes ``mixer`` like an :class:`MMDiM`.
    """

    def __init__(self, attn: PyramidMMDiMAttention):
        super().__init__()
        self.attn = attn

    @property
    def mixer(self):
        return self.attn.mmdim.mixer

    def forward(self, hidden_states: list[torch.Tensor], stages: list[dict]):
        outs = [self.attn(hs, **ctx) for hs, ctx in zip(hidden_states, stages)]
        return torch.cat(outs, dim=1), None


@torch.no_grad()
def calibrate_output_norms(targets: dict[int, Stage1Target], records: dict[int, LayerRecord]) -> None:
    """Per-head output-scale calibration (``calibrate_output_norm``) over all stages of a record."""
    from m4v_convert.layers.init_from_attention import calibrate_output_norm

    for i, target in targets.items():
        rec = records[i]
        if rec.pre_out is None:
            continue
        captured: list[torch.Tensor] = []
        h = target.mixer.out_proj.register_forward_hook(lambda m, a, o: captured.append(a[0].flatten(0, -2)))
        try:
            target(rec.hidden_states, **rec.context)
        finally:
            h.remove()
        calibrate_output_norm(target.attn.mmdim, torch.cat(captured), rec.pre_out)
