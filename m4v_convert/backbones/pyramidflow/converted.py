"""PyramidFlow → M4V hybrid: the single-stream blocks' attention becomes MM-DiM (and, where a
recipe allows it, the double-stream / joint blocks' attention too).

As in the M4V paper, the 8 double-stream blocks (``transformer_blocks.{i}``) stay and the 16
single-stream blocks (``single_transformer_blocks.{j}``) get one MM-DiM each, whose parameters
are shared by text and video (a single-stream block already shares them). Layers are numbered
globally, double-stream first: block ``i`` of ``--layers`` is ``transformer_blocks.{i}`` for
``i < num_layers`` and ``single_transformer_blocks.{i - num_layers}`` after (``8-23`` at full size).

**Double-stream / joint blocks** (miniFLUX with ``allow_double_stream: true``; the SD3 variant,
which has nothing else) keep their norms and both MLPs; only ``attn`` is swapped, for a
:class:`PyramidMMDiMJointAttention` whose MM-DiM has ``text_projections``: the sandwich's text
rows use the text stream's ``add_q/k/v_proj``, ``to_add_out`` and context q/k norms, the video
rows ``to_q/k/v``, ``to_out`` and ``norm_q/k``, and both are scanned as one sequence, as the
teacher attends over ``[text ; video]``. Init is exact in the same sense as for single-stream
blocks (normalized causal linear attention with each stream's weights; tested).

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

import contextlib
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
from diffusers.models.normalization import AdaLayerNormZeroSingle

from m4v_convert.convert import register_handler
from m4v_convert.distill.records import LayerRecord
from m4v_convert.errors import M4VError
from m4v_convert.layers.init_from_attention import AttentionWeights, mmdim_from_attention
from m4v_convert.layers.mmdim import MMDiM, MMDiMConfig
from m4v_convert.layers.recompose import FrameBlock, VideoLayout
from m4v_convert.models.converted import ConvertedModelMixin, converted_init

from .attention import _context_norms
from .layout import StageLayout
from .miniflux import PyramidFluxTransformer
from .sd3 import PyramidDiffusionMMDiT

SINGLE_BLOCK_PATTERN = re.compile(r"^single_transformer_blocks\.(\d+)$")
JOINT_ATTENTION_PATTERN = re.compile(r"^transformer_blocks\.(\d+)\.attn$")
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


def run_mmdim(attn: nn.Module, video: torch.Tensor, text: torch.Tensor, token_layout: StageLayout | None,
              image_rotary_emb) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``attn.mmdim`` on one stage: video tokens with the stage's frame blocks, the text with its T5
    mask, the video rows of the RoPE tables, the history frames as temporal sources."""
    if token_layout is None:
        raise RuntimeError(f"{type(attn).__name__} needs the stage's token layout; run it inside a converted "
                           "PyramidFlow model, which passes token_layout to every attention call")
    lz = text.shape[1]
    mask = token_layout.text_mask.to(video.device)
    return attn.mmdim(video, video_layout(token_layout), text if lz else None, mask if lz else None,
                      video_rotary(image_rotary_emb, lz), history_sources(token_layout, video.device))


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
        if encoder_hidden_states is not None:
            raise ValueError("PyramidMMDiMAttention replaces single-stream attention: pass [text ; video] as "
                             "hidden_states and no encoder_hidden_states")
        lz = token_layout.text_len if token_layout is not None else 0
        video_out, text_out = run_mmdim(self, hidden_states[:, lz:], hidden_states[:, :lz], token_layout,
                                        image_rotary_emb)
        return video_out if text_out is None else torch.cat([text_out, video_out], dim=1)


class PyramidMMDiMJointAttention(nn.Module):
    """Stands in ``transformer_blocks.{i}.attn`` (miniFLUX double-stream, SD3 joint): same call,
    returns ``(video_out, text_out)`` projected to the model width, as the teacher's attention.

    The MM-DiM has ``text_projections``: the text rows of the sandwich use the block's text-stream
    weights (``add_q/k/v_proj``, ``to_add_out``, context q/k norms), the video rows the image ones,
    and both are scanned as one sequence (as the teacher attends over ``[text ; video]``).
    ``text_out`` is None for a context-pre-only block (SD3's last), whose text output is unused;
    without the text sandwich the text stream gets no attention update (zeros).
    """

    def __init__(self, mmdim: MMDiM, context_pre_only: bool = False):
        super().__init__()
        if not mmdim.config.text_projections:
            raise ValueError("PyramidMMDiMJointAttention needs an MM-DiM with text_projections (separate text weights)")
        self.mmdim = mmdim
        self.context_pre_only = context_pre_only

    @property
    def mixer(self):
        return self.mmdim.mixer

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                token_layout: StageLayout | None = None, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("PyramidMMDiMJointAttention replaces joint attention: pass the text as "
                             "encoder_hidden_states")
        video_out, text_out = run_mmdim(self, hidden_states, encoder_hidden_states, token_layout, image_rotary_emb)
        if self.context_pre_only:
            return video_out, None
        return video_out, (torch.zeros_like(encoder_hidden_states) if text_out is None else text_out)


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


def joint_attention_weights(attn: nn.Module) -> tuple[AttentionWeights, AttentionWeights]:
    """(video, text) Q/K/V/O (+ biases, per-head q/k norms) of a joint attention module.

    Works on diffusers' ``FluxAttention`` (``norm_added_q/k``) and the SD3 release's
    :class:`~.attention.PyramidJointAttention` (``norm_add_q/k``). A context-pre-only block has no
    ``to_add_out``: its text out-projection starts at zero (the output is never read).
    """

    def t(x):
        return None if x is None else x.detach()

    def norm_weight(norm):
        if norm is not None and not isinstance(norm, nn.RMSNorm) and type(norm).__name__ != "RMSNorm":
            raise ValueError(f"q/k norm {type(norm).__name__}: only RMSNorm can be carried onto B/C (bc_norm)")
        return None if norm is None else t(getattr(norm, "weight", None))

    def bias(lin):
        return None if lin.bias is None else lin.bias.detach()

    heads, hd = attn.heads, attn.head_dim
    video = AttentionWeights(
        heads=heads, head_dim=hd, q_weight=t(attn.to_q.weight), k_weight=t(attn.to_k.weight),
        v_weight=t(attn.to_v.weight), out_weight=t(attn.to_out[0].weight), q_bias=bias(attn.to_q),
        k_bias=bias(attn.to_k), v_bias=bias(attn.to_v), out_bias=bias(attn.to_out[0]),
        q_norm_weight=norm_weight(attn.norm_q), k_norm_weight=norm_weight(attn.norm_k),
    )
    to_add_out = getattr(attn, "to_add_out", None)
    norm_cq, norm_ck = _context_norms(attn)
    out_weight = (t(to_add_out.weight) if to_add_out is not None
                  else torch.zeros_like(attn.to_out[0].weight).detach())
    text = AttentionWeights(
        heads=heads, head_dim=hd, q_weight=t(attn.add_q_proj.weight), k_weight=t(attn.add_k_proj.weight),
        v_weight=t(attn.add_v_proj.weight), out_weight=out_weight, q_bias=bias(attn.add_q_proj),
        k_bias=bias(attn.add_k_proj), v_bias=bias(attn.add_v_proj),
        out_bias=bias(to_add_out) if to_add_out is not None else None,
        q_norm_weight=norm_weight(norm_cq), k_norm_weight=norm_weight(norm_ck),
    )
    return video, text


@dataclass
class PyramidJointAttentionToMMDiM:
    """Swap config for ``transformer_blocks.{i}.attn``: recipe ``mmdim`` settings (text projections on)."""

    mmdim: dict = field(default_factory=dict)

    def block_config(self, attn: nn.Module, index: int) -> MMDiMConfig:
        return MMDiMConfig(d_model=attn.to_q.in_features, nheads=attn.heads, headdim=attn.head_dim,
                           layer_index=index, **{**self.mmdim, "text_projections": True})


@register_handler(PyramidJointAttentionToMMDiM)
def _joint_attention_to_mmdim(attn: nn.Module, fqn: str, config: PyramidJointAttentionToMMDiM) -> nn.Module:
    m = JOINT_ATTENTION_PATTERN.match(fqn)
    if m is None:
        raise ValueError(f"{fqn!r} is not a PyramidFlow joint attention (expected transformer_blocks.N.attn)")
    video, text = joint_attention_weights(attn)
    w = attn.to_q.weight
    mmdim = mmdim_from_attention(config.block_config(attn, int(m.group(1))), video, device=w.device, dtype=w.dtype,
                                 text_weights=text)
    return PyramidMMDiMJointAttention(mmdim, context_pre_only=bool(getattr(attn, "context_pre_only", False)))


def split_layers(layers: Sequence[int], num_double: int) -> tuple[list[int], list[int]]:
    """Global layer indices → (double-stream indices, single-stream block indices)."""
    double = [i for i in layers if i < num_double]
    single = [i - num_double for i in layers if i >= num_double]
    return double, single


# ----------------------------------------------------------------------------- converted model

class _ConvertedPyramidMixin(ConvertedModelMixin):
    """What the converted miniFLUX and SD3 classes share: building converted layers from
    ``config["m4v"]``, the swap, and naming pyramid levels from ``m4v.full_grid``.

    Layers are numbered globally: ``transformer_blocks.{i}`` (double-stream / joint) is ``i``,
    ``single_transformer_blocks.{j}`` is ``num_layers + j``.
    """

    converted_types = (PyramidMMDiMJointAttention, MMDiMSingleTransformerBlock)

    @property
    def _num_double(self) -> int:
        return int(self.config.num_layers)

    @property
    def _num_single(self) -> int:
        return len(getattr(self, "single_transformer_blocks", ()))

    def _build_converted(self, m4v: dict) -> None:
        n_double, n_single = self._num_double, self._num_single
        for key, cfg in sorted(m4v.get("layers", {}).items(), key=lambda kv: int(kv[0])):
            i, config = int(key), MMDiMConfig.from_dict(cfg)
            if 0 <= i < n_double:
                old = self.transformer_blocks[i].attn
                if not config.text_projections:
                    raise ValueError(f"m4v.layers: layer {key} is a double-stream block but its MMDiMConfig has no "
                                     "text_projections")
                self.transformer_blocks[i].attn = PyramidMMDiMJointAttention(
                    MMDiM(config), context_pre_only=bool(getattr(old, "context_pre_only", False)))
            elif 0 <= i - n_double < n_single:
                dim = self.inner_dim
                self.single_transformer_blocks[i - n_double] = MMDiMSingleTransformerBlock(
                    dim, int(dim * MLP_RATIO), config)
            else:
                raise ValueError(f"m4v.layers: layer {key} is not a block of this model (0-{n_double + n_single - 1})")

    def _swaps(self, layers: Sequence[int], mmdim: dict):
        """The blocks of global indices ``layers``: single-stream blocks whole
        (:class:`MMDiMSingleTransformerBlock`), double-stream / joint blocks' attention
        (:class:`PyramidMMDiMJointAttention`, separate text weights). Whether a recipe may convert
        double-stream blocks is the pipeline's decision, not the model's."""
        n_double, n_single = self._num_double, self._num_single
        bad = [i for i in layers if not 0 <= i < n_double + n_single]
        if bad:
            raise M4VError(f"layers {bad} out of range; this model has layers 0-{n_double + n_single - 1}")
        double, single = split_layers(layers, n_double)
        swaps = []
        if double:
            swaps.append((PyramidJointAttentionToMMDiM(mmdim=mmdim), {f"transformer_blocks.{i}.attn" for i in double}))
        if single:
            swaps.append((PyramidSingleBlockToMMDiM(mmdim=mmdim, num_double_layers=n_double),
                          {f"single_transformer_blocks.{j}" for j in single}))
        return swaps

    def converted_modules(self) -> dict[int, nn.Module]:
        """Global layer index → the converted attention module (joint or single-stream), each with ``.mmdim``."""
        out = {i: blk.attn for i, blk in enumerate(self.transformer_blocks)
               if isinstance(blk.attn, PyramidMMDiMJointAttention)}
        out.update({self._num_double + j: blk.attn
                    for j, blk in enumerate(getattr(self, "single_transformer_blocks", ()))
                    if isinstance(blk, MMDiMSingleTransformerBlock)})
        return out

    @contextlib.contextmanager
    def pyramid_top_grid(self, grid: tuple[int, int]):
        """Within the block, single-stage calls name their pyramid levels from ``grid``, the top-level
        token grid of the video being sampled (``m4v.full_grid`` is the recipe's full resolution, which a
        smaller video does not match): each frame then gets its level's register, as in training."""
        before = getattr(self, "_top_grid", None)
        self._top_grid = tuple(grid)
        try:
            yield self
        finally:
            self._top_grid = before

    def token_layouts(self, sample, encoder_attention_mask, *, full_grid=None) -> list[StageLayout]:
        """As the teacher's, but levels are also named from the sampler's grid
        (:meth:`pyramid_top_grid`) or ``m4v.full_grid`` (single-stage calls)."""
        grid = full_grid or getattr(self, "_top_grid", None) or (self.config.get("m4v") or {}).get("full_grid")
        if grid is not None:
            layouts = self.teacher_class.token_layouts(self, sample, encoder_attention_mask, full_grid=tuple(grid))
            if all(b.level is not None for lay in layouts for b in lay.blocks):
                return layouts
        return self.teacher_class.token_layouts(self, sample, encoder_attention_mask)


class M4VPyramidFluxTransformer(_ConvertedPyramidMixin, PyramidFluxTransformer):
    """``PyramidFluxTransformer`` with some blocks converted to MM-DiM.

    Same forward arguments as the teacher. ``m4v`` (saved in ``config.json``) records the
    conversion: toolkit version, recipe, source, ``full_grid`` (top-level token grid used to name
    pyramid levels) and one ``MMDiMConfig`` dict per converted layer, keyed by global layer index.
    """

    __init__ = converted_init(PyramidFluxTransformer)
    teacher_class = PyramidFluxTransformer


class M4VPyramidDiffusionMMDiT(_ConvertedPyramidMixin, PyramidDiffusionMMDiT):
    """The SD3 variant with some joint blocks' attention converted to MM-DiM (text projections)."""

    __init__ = converted_init(PyramidDiffusionMMDiT)
    teacher_class = PyramidDiffusionMMDiT


CONVERTED_CLASSES = {"M4VPyramidFluxTransformer": M4VPyramidFluxTransformer,
                     "M4VPyramidDiffusionMMDiT": M4VPyramidDiffusionMMDiT}
#: the converted class of each teacher variant
CONVERTED_FOR_VARIANT = {"miniflux": M4VPyramidFluxTransformer, "sd3": M4VPyramidDiffusionMMDiT}


class FlatPrediction(nn.Module):
    """A PyramidFlow model called the way stage 2 calls diffusers models (``model(**batch,
    return_dict=False)[0]``): its per-stage predictions flattened and concatenated, ``(B, ·)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, return_dict: bool = False, **batch):
        return (torch.cat([o.flatten(1) for o in self.model(**batch)], dim=1),)


# ----------------------------------------------------------------------------- stage-1 records

def _valid_rows(layout: StageLayout, device) -> torch.Tensor:
    """``(B, L)`` bool: valid text and all video tokens (padded T5 rows are False)."""
    mask = layout.text_mask.to(device)
    return torch.cat([mask, mask.new_ones(mask.shape[0], layout.video_len)], dim=1)


@torch.no_grad()
def record_teacher_layers(teacher: nn.Module, batch: dict, layers: Sequence[int]) -> dict[int, LayerRecord]:
    """Run ``teacher`` once on ``batch`` (one model call, several stages) and return, per selected
    global layer index, its attention input and output over all stages.

    ``hidden_states`` is a list over stages of the attention input ``(B, L_s, d)`` (single-stream:
    ``[text ; video]``; joint: the video tokens, the text being ``encoder_hidden_states`` in the
    stage's context); ``context`` is ``{"stages": [{"token_layout", "image_rotary_emb", ...}, ...]}``;
    ``output`` is the teacher's attention contribution in model space, ``[text ; video]`` per stage
    (single-stream: its output times the attention columns of ``proj_out``; joint: the
    ``to_add_out`` / ``to_out`` outputs, zero text for a context-pre-only block), padded T5 rows
    zeroed, concatenated over stages along the token axis; ``pre_out`` the teacher's attention
    output before the (video) out projection at the valid rows, flattened to ``(rows, d)`` (for the
    per-head output-scale calibration). Train with :class:`Stage1Target`.
    """
    n_double = teacher.config.num_layers
    double, single = split_layers(layers, n_double)
    seen: dict[int, list] = {i: [] for i in layers}
    pre_seen: dict[int, list] = {i: [] for i in double}

    def tap(i):
        def hook(module, args, kwargs, output):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            seen[i].append((hs.detach(), kwargs, output))
        return hook

    handles = [teacher.single_transformer_blocks[j].attn.register_forward_hook(tap(n_double + j), with_kwargs=True)
               for j in single]
    for i in double:
        attn = teacher.transformer_blocks[i].attn
        handles.append(attn.register_forward_hook(tap(i), with_kwargs=True))
        handles.append(attn.to_out[0].register_forward_hook(
            lambda m, a, o, i=i: pre_seen[i].append(a[0].detach())))
    try:
        teacher(**batch)
    finally:
        for h in handles:
            h.remove()
    records = {}
    for i in layers:
        inputs, contexts, outputs, pre = [], [], [], []
        for s_idx, (hs, kwargs, out) in enumerate(seen[i]):
            layout, rope = kwargs.get("token_layout"), kwargs.get("image_rotary_emb")
            valid = _valid_rows(layout, hs.device)
            context = {"token_layout": layout, "image_rotary_emb": rope}
            if i < n_double:
                text = kwargs["encoder_hidden_states"].detach()
                video_out, text_out = out
                text_out = torch.zeros_like(text) if text_out is None else text_out
                full = torch.cat([text_out, video_out], dim=1)
                context["encoder_hidden_states"] = text
                pre.append(pre_seen[i][s_idx].flatten(0, -2))
            else:
                block = teacher.single_transformer_blocks[i - n_double]
                dim = block.proj_out.out_features
                full = out @ block.proj_out.weight[:, :dim].t().to(out.dtype)
                pre.append(out[valid])
            inputs.append(hs)
            contexts.append(context)
            outputs.append(full.detach() * valid.unsqueeze(-1).to(full.dtype))
        records[i] = LayerRecord(inputs, torch.cat(outputs, dim=1), {"stages": contexts},
                                 pre_out=torch.cat(pre, dim=0))
    return records


class Stage1Target(nn.Module):
    """What stage 1 trains for one converted layer: the MM-DiM attention (single-stream or joint)
    run over every stage of a recorded call, ``[text ; video]`` outputs concatenated along the
    token axis (as :func:`record_teacher_layers` concatenates the teacher's). Exposes ``mixer``
    like an :class:`MMDiM`.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    @property
    def mixer(self):
        return self.attn.mmdim.mixer

    def forward(self, hidden_states: list[torch.Tensor], stages: list[dict]):
        outs = []
        for hs, ctx in zip(hidden_states, stages):
            out = self.attn(hs, **ctx)
            if isinstance(out, tuple):  # joint: (video, text or None)
                video_out, text_out = out
                text_out = torch.zeros_like(ctx["encoder_hidden_states"]) if text_out is None else text_out
                out = torch.cat([text_out, video_out], dim=1)
            outs.append(out)
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


def converted_class_for_config(cfg: dict) -> type | None:
    """The class that rebuilds a saved PyramidFlow conversion (registry entry ``pyramidflow``), or None."""
    return CONVERTED_CLASSES.get(cfg.get("_class_name"))
