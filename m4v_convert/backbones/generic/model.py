"""The generic adapter: a ``backbone: generic`` recipe → load, select, swap, record, save/load.

A recipe (``docs/recipes.md``) names a diffusers class, a regex for its attention modules, where
Q/K/V/O and their norms live, how the attention's sequence is laid out, how the frame grid is
read off the model's input and where the RoPE tables come from. From that alone this module

* finds and checks the attention layers on a **meta-device** model built from ``config.json``
  (:func:`find_layers`, :func:`layer_geometry`), so every mistake is refused before weights load;
* builds :func:`converted_class` ``M4V<DiffusersClass>``, a subclass of the diffusers class with
  the **same forward arguments**, whose forward records the per-call context (frame grid, text
  mask, text / RoPE tables from named submodules) that the replaced attention modules read;
* swaps each selected attention for a :class:`GenericMMDiMAttention` that takes the original
  call (same argument names) and returns what the original returned (one tensor, or a
  (video, text) pair for joint attention), initialized from its weights;
* for a fused output projection (``out: {path: ../proj_out, columns: [a, b]}``) moves W_O into the
  MM-DiM and replaces the fused layer with a :class:`FusedOutputRemainder` of the other columns;
* records the teacher's layer inputs/outputs for stage 1 with hooks on the matched modules
  (:func:`record_teacher_layers`) and turns calibration batches into forward arguments
  (:func:`model_inputs`).

The converted config records the recipe and one ``MMDiMConfig`` per layer, so
``m4v_convert.load_converted(dir)`` rebuilds the model with no recipe file at hand.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from m4v_convert.convert import register_handler
from m4v_convert.distill.records import LayerRecord
from m4v_convert.errors import CheckpointError, M4VError, RecipeError
from m4v_convert.layers.init_from_attention import AttentionWeights, mmdim_from_attention
from m4v_convert.layers.mmdim import MMDiM, MMDiMConfig
from m4v_convert.layers.recompose import VideoLayout
from m4v_convert.models.converted import ConvertedModelMixin, converted_init
from m4v_convert.recipe_schema import SIZE_RE, SLICE_RE, RecipeFile

CONVERTED_PREFIX = "M4V"


# ============================================================================ the recipe, resolved


def diffusers_class(name: str) -> type:
    import diffusers

    cls = getattr(diffusers, name, None)
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise RecipeError(f"model.class: diffusers {diffusers.__version__} has no model class {name!r}")
    return cls


def resolve_size(value, config: dict, module: nn.Module | None = None, what: str = "size") -> int:
    """An int, ``config.KEY`` / ``config.KEY[i]`` (None → 1: an absent patch size) or ``module.ATTR``."""
    if isinstance(value, int):
        return value
    if SIZE_RE.match(value):
        m = re.match(r"^config\.(\w+)(?:\[(\d+)\])?$", value)
        key, idx = m.group(1), m.group(2)
        if key not in config:
            raise RecipeError(f"{what}: {value!r} names config key {key!r}, which the model's config lacks")
        v = config[key]
        if idx is not None:
            if not isinstance(v, (list, tuple)) or int(idx) >= len(v):
                raise RecipeError(f"{what}: {value!r}: config {key} = {v!r} has no element {idx}")
            v = v[int(idx)]
        if v is None:
            return 1
        if isinstance(v, (list, tuple)) or not isinstance(v, (int, float)):
            raise RecipeError(f"{what}: {value!r} is {v!r}, not a number")
        return int(v)
    if value.startswith("module.") and module is not None:
        attr = value.split(".", 1)[1]
        v = getattr(module, attr, None)
        if not isinstance(v, int):
            raise RecipeError(f"{what}: {value!r}: the attention module ({type(module).__name__}) has no int "
                              f"attribute {attr!r}")
        return v
    raise RecipeError(f"{what}: cannot resolve {value!r}")


def resolve_bound(value, inner: int, d_model: int) -> int:
    if isinstance(value, int):
        return value
    m = SLICE_RE.match(value)
    base = inner if m.group(2) == "inner" else d_model
    return int(m.group(1) or 1) * base


def path_fqn(attn_fqn: str, path: str) -> str:
    """Module name of ``path`` relative to the attention ``attn_fqn`` ("../x" climbs to its parent)."""
    parts = attn_fqn.split(".") if attn_fqn else []
    while path.startswith("../"):
        path = path[3:]
        if not parts:
            raise RecipeError(f"path '../{path}' climbs above the model from {attn_fqn!r}")
        parts = parts[:-1]
    return ".".join(parts + [path])


def get_module(model: nn.Module, fqn: str) -> nn.Module | None:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        return None


@dataclass
class LayerInfo:
    """One matched attention layer and what the recipe says about it (shapes from the model)."""

    index: int
    fqn: str
    module: nn.Module
    heads: int = 0
    head_dim: int = 0
    d_model: int = 0
    q: tuple = ()  # (fqn, rows slice or None)
    k: tuple = ()
    v: tuple = ()
    out: tuple = ()  # (fqn, columns slice or None)
    q_norm: str | None = None
    k_norm: str | None = None
    shapes: dict = field(default_factory=dict)  # name → shape as read (for `recipes --check`)

    @property
    def fused_out(self) -> bool:
        return self.out[1] is not None


def find_layers(model: nn.Module, spec: RecipeFile, where: str = "recipe") -> list[LayerInfo]:
    """Every module whose name fully matches ``attention.pattern``, checked to be an attention layer."""
    a = spec.attention
    rx = re.compile(a.pattern)
    found = [(n, m) for n, m in model.named_modules() if n and rx.fullmatch(n)]
    if not found:
        hints = [n for n, m in model.named_modules() if re.search(r"attn|attention", n.split(".")[-1], re.I)][:6]
        raise RecipeError(f"{where}: field 'attention.pattern' {a.pattern!r} matches no module of "
                          f"{type(model).__name__}" + (f" (attention-like modules: {', '.join(hints)}, ...)"
                                                        if hints else ""))
    layers, seen = [], {}
    for pos, (name, module) in enumerate(found):
        m = rx.fullmatch(name)
        index = int(m.group(1)) if m.groups() and m.group(1) is not None and m.group(1).isdigit() else pos
        if index in seen:
            raise RecipeError(f"{where}: field 'attention.pattern' gives layer number {index} to both "
                              f"{seen[index]!r} and {name!r}; its first group must be the layer number")
        seen[index] = name
        cls_name = type(module).__name__
        if a.module_class is not None and cls_name not in a.module_class:
            raise RecipeError(f"{where}: field 'attention.pattern' matches {name!r}, a {cls_name}, which is not "
                              f"an attention module of class {a.module_class} (field 'attention.class')")
        for part in ("q", "k", "v", "out"):
            proj = getattr(a, part)
            target = path_fqn(name, proj.path)
            sub = get_module(model, target)
            if not isinstance(sub, nn.Linear):
                what = "nothing" if sub is None else f"a {type(sub).__name__}"
                raise RecipeError(f"{where}: field 'attention.pattern' matches {name!r} ({cls_name}), which is "
                                  f"not an attention layer as described: field 'attention.{part}.path' "
                                  f"{proj.path!r} is {what} there, expected a Linear")
        layers.append(LayerInfo(index=index, fqn=name, module=module))
    return sorted(layers, key=lambda info: info.index)


def layer_geometry(model: nn.Module, info: LayerInfo, spec: RecipeFile, config: dict, mmdim: dict,
                   where: str = "recipe") -> LayerInfo:
    """Fill in heads, head_dim, d_model, projections and norms; refuse shapes that disagree."""
    a = spec.attention
    heads = resolve_size(a.heads, config, info.module, "attention.heads")
    lin = {p: get_module(model, path_fqn(info.fqn, getattr(a, p).path)) for p in ("q", "k", "v", "out")}
    d_model = lin["q"].in_features
    if a.head_dim is not None:
        head_dim = resolve_size(a.head_dim, config, info.module, "attention.head_dim")
    elif a.q.rows is not None and any(isinstance(b, str) and "inner" in b for b in a.q.rows):
        raise RecipeError(f"{where}: field 'attention.q.rows' uses 'inner' (heads × head_dim): declare "
                          "field 'attention.head_dim' too")
    else:
        width = (a.q.rows[1] - a.q.rows[0]) if a.q.rows is not None else lin["q"].out_features
        head_dim = max(1, width // heads)
    inner = heads * head_dim
    q_rows = _slice(a.q.rows, lin["q"].out_features, inner, d_model, info, "q", where)
    q_width = (q_rows[1] - q_rows[0]) if q_rows else lin["q"].out_features
    if q_width != inner or q_width % heads:
        raise RecipeError(f"{where}: layer {info.fqn}: Q has {q_width} output features, which disagrees with "
                          f"the declared heads ({a.heads!r} = {heads}) × head_dim {head_dim} = {inner} "
                          "(fields 'attention.heads' / 'attention.head_dim')")
    info.shapes = {}
    for part in ("q", "k", "v"):
        rows = _slice(getattr(a, part).rows, lin[part].out_features, inner, d_model, info, part, where)
        width = (rows[1] - rows[0]) if rows else lin[part].out_features
        if width != inner:
            raise RecipeError(f"{where}: layer {info.fqn}: {part.upper()} has {width} output features, expected "
                              f"heads × head_dim = {heads} × {head_dim} = {inner} (field 'attention.heads'; "
                              "grouped K/V heads are not supported)")
        if lin[part].in_features != d_model:
            raise RecipeError(f"{where}: layer {info.fqn}: {part.upper()} reads {lin[part].in_features} features "
                              f"but Q reads {d_model}; the MM-DiM needs Q, K and V over the same tokens "
                              "(a cross-attention is not a layer to replace)")
        setattr(info, part, (path_fqn(info.fqn, getattr(a, part).path), rows))
        info.shapes[part] = (width, d_model) if rows else tuple(lin[part].weight.shape)
    out = lin["out"]
    cols = _slice(a.out.columns, out.in_features, inner, d_model, info, "out", where, what="columns")
    width = (cols[1] - cols[0]) if cols else out.in_features
    if width != inner:
        field = "attention.out.columns" if cols else "attention.out"
        raise RecipeError(f"{where}: layer {info.fqn}: the output projection reads {width} features, expected "
                          f"heads × head_dim = {inner} (field '{field}')")
    if out.out_features != d_model:
        raise RecipeError(f"{where}: layer {info.fqn}: the output projection writes {out.out_features} features, "
                          f"expected the model width {d_model}")
    if cols is not None and inner != d_model:
        raise RecipeError(f"{where}: layer {info.fqn}: a fused output projection can only be split when "
                          f"heads × head_dim ({inner}) equals the model width ({d_model})")
    info.out = (path_fqn(info.fqn, a.out.path), cols)
    info.shapes["out"] = tuple(out.weight.shape)
    bc_norm = mmdim.get("bc_norm", "none")
    for part in ("q_norm", "k_norm"):
        norm_spec = getattr(a, part)
        if norm_spec is None:
            continue
        target = path_fqn(info.fqn, norm_spec.path)
        norm = get_module(model, target)
        if norm is None:
            raise RecipeError(f"{where}: layer {info.fqn}: field 'attention.{part}.path' {norm_spec.path!r} is "
                              "nothing there")
        weight = getattr(norm, "weight", None)
        if weight is not None and bc_norm != "none":
            expected = head_dim if bc_norm == "per_group" else inner
            if weight.numel() != expected:
                raise RecipeError(f"{where}: layer {info.fqn}: {norm_spec.path} (field 'attention.{part}') has "
                                  f"{weight.numel()} weights but field 'mmdim.bc_norm' {bc_norm!r} needs {expected} "
                                  "(per_group: head_dim, across_groups: heads × head_dim)")
        setattr(info, part, target)
        info.shapes[part] = tuple(weight.shape) if weight is not None else ()
    info.heads, info.head_dim, info.d_model = heads, head_dim, d_model
    return info


def _slice(bounds, size, inner, d_model, info, part, where, what="rows"):
    if bounds is None:
        return None
    lo, hi = (resolve_bound(b, inner, d_model) for b in bounds)
    if not 0 <= lo < hi <= size:
        raise RecipeError(f"{where}: layer {info.fqn}: field 'attention.{part}.{what}' {list(bounds)} = [{lo}, {hi}) "
                          f"is out of range for a projection with {size} {'outputs' if what == 'rows' else 'inputs'}")
    return (lo, hi)


def attention_weights(model: nn.Module, info: LayerInfo) -> AttentionWeights:
    """The tensors of one layer, slices of fused projections applied."""

    def rows(part):
        fqn, sl = getattr(info, part)
        lin = model.get_submodule(fqn)
        w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
        if sl is not None:
            w = w[sl[0]:sl[1]]
            b = None if b is None else b[sl[0]:sl[1]]
        return w, b

    (qw, qb), (kw, kb), (vw, vb) = rows("q"), rows("k"), rows("v")
    out_fqn, cols = info.out
    out = model.get_submodule(out_fqn)
    ow = out.weight.detach()
    ob = None if out.bias is None else out.bias.detach()
    if cols is not None:
        ow, ob = ow[:, cols[0]:cols[1]], None  # the fused layer keeps its bias (FusedOutputRemainder)

    def norm_weight(fqn):
        if fqn is None:
            return None
        w = getattr(model.get_submodule(fqn), "weight", None)
        return None if w is None else w.detach()

    return AttentionWeights(heads=info.heads, head_dim=info.head_dim, q_weight=qw, k_weight=kw, v_weight=vw,
                            out_weight=ow, q_bias=qb, k_bias=kb, v_bias=vb, out_bias=ob,
                            q_norm_weight=norm_weight(info.q_norm), k_norm_weight=norm_weight(info.k_norm))


# ============================================================================ per-call context


@dataclass
class GenericCallContext:
    """What a converted attention needs and its caller does not pass it (one forward call)."""

    layout: VideoLayout | None = None
    text: torch.Tensor | None = None  # (b, Lz, d) from a module output / forward argument
    text_mask: torch.Tensor | None = None  # (b, Lz) bool
    rotary: tuple | None = None  # raw (cos, sin) from a module output

    def clear(self) -> None:
        self.layout = self.text = self.text_mask = self.rotary = None


def grid_layout(spec: RecipeFile, config: dict, call: dict) -> VideoLayout:
    """The token grid of one forward call, read off its input per ``grid``."""
    g = spec.grid
    if g.layout == "BNC":
        sizes = []
        for name in (g.args.frames, g.args.height, g.args.width):
            v = call.get(name)
            if v is None:
                raise M4VError(f"grid.args: the forward argument {name!r} is needed for the token grid and was "
                               "not given")
            sizes.append(int(v))
        return VideoLayout.single(*sizes)
    x = call.get(g.input)
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        raise M4VError(f"grid.input: forward argument {g.input!r} must be a 5-D {g.layout} tensor, got "
                       f"{getattr(x, 'shape', type(x).__name__)}")
    f, h, w = (x.shape[2], x.shape[3], x.shape[4]) if g.layout == "BCFHW" else (x.shape[1], x.shape[3], x.shape[4])
    pt, ph, pw = (resolve_size(getattr(g.patch, k), config, what=f"grid.patch.{k}") for k in "thw")
    return VideoLayout.single(f // pt, h // ph, w // pw)


def text_mask_from_call(spec: RecipeFile, call: dict) -> torch.Tensor | None:
    src = spec.tokens.text_mask
    if src.source == "none":
        return None
    t = call.get(src.name)
    if t is None:
        return None
    if src.source == "zero_rows":
        return t.ne(0).any(-1)
    if t.dim() != 2:
        raise M4VError(f"tokens.text_mask: forward argument {src.name!r} must be (batch, text_len), got "
                       f"{tuple(t.shape)}")
    return t > 0.5 if t.is_floating_point() else t.bool()


def rope_tables(rope, span: str, nheads: int, d_state: int, n_tokens: int):
    """A model's (cos, sin) → two (N, w) or (b, N, w) tables for MM-DiM (w = d_state, or
    nheads·d_state for ``span: all_heads``). Accepts any layout with the token axis (size N) before
    the last one and singleton axes elsewhere, e.g. (N, w), (b, N, w), Wan's (1, N, 1, w)."""
    if rope is None:
        return None
    if not isinstance(rope, (tuple, list)) or len(rope) != 2 or not all(isinstance(t, torch.Tensor) for t in rope):
        raise M4VError("rope: expected a (cos, sin) pair of tensors (real, repeat-interleaved); complex "
                       "tables are not supported")
    width = d_state if span == "head" else nheads * d_state
    out = []
    for t in rope:
        if t.shape[-1] != width:
            raise M4VError(f"rope: table of width {t.shape[-1]}, expected {width} (rope.span: {span})")
        axes = [i for i in range(t.dim() - 1) if t.shape[i] == n_tokens]
        if not axes:
            raise M4VError(f"rope: table of shape {tuple(t.shape)} has no axis of the {n_tokens} video tokens")
        t = t.movedim(axes[-1], -2)
        lead = [n for n in t.shape[:-2] if n != 1]
        if len(lead) > 1:
            raise M4VError(f"rope: cannot read a (batch, tokens, {width}) table off shape {tuple(t.shape)}")
        t = t.reshape(*lead, n_tokens, width)
        out.append(t)
    return tuple(out)


# ============================================================================ replacement modules


class GenericMMDiMAttention(nn.Module):
    """Drop-in for a matched attention module: same call arguments, same return structure.

    ``call`` (saved in the converted config) says how to read the original call: its positional
    argument names, which argument holds the video (and, for joint attention, the text), where
    the RoPE tables are, and what to return.
    """

    def __init__(self, mmdim: MMDiM, call: dict):
        super().__init__()
        self.mmdim = mmdim
        self.call = dict(call)
        self.context: GenericCallContext | None = None

    def forward(self, *args, **kwargs):
        ctx = self.context
        if ctx is None or ctx.layout is None:
            raise RuntimeError("GenericMMDiMAttention needs the frame grid of the current call; run it inside the "
                               "converted model's forward (load it with m4v_convert.load_converted)")
        c = self.call
        bound = dict(zip(c["arg_names"], args))
        bound.update(kwargs)
        video = bound[c["video_arg"]]
        if c["layout"] == "joint":
            text = bound.get(c["text_arg"])
        else:
            text = ctx.text
        mask = ctx.text_mask
        if text is not None and mask is not None and mask.shape[-1] != text.shape[1]:
            raise M4VError(f"tokens.text_mask: the mask covers {mask.shape[-1]} text tokens but the attention "
                           f"sees {text.shape[1]}")
        if text is None:
            mask = None
        rope_src = c["rope"]
        raw = bound.get(rope_src["name"]) if rope_src["source"] == "call_arg" else ctx.rotary
        cfg = self.mmdim.config
        rotary = (rope_tables(raw, rope_src["span"], cfg.nheads, cfg.d_state, ctx.layout.num_tokens)
                  if cfg.rotary else None)
        video_out, text_out = self.mmdim(video, ctx.layout, text, mask, rotary)
        if c["returns"] == ["video"]:
            return video_out
        if text_out is None:  # no text sandwich: the text stream gets no update from this layer
            text_out = torch.zeros_like(text) if text is not None else None
        parts = {"video": video_out, "text": text_out}
        return tuple(parts[k] for k in c["returns"])

    def extra_repr(self) -> str:
        return f"layout={self.call['layout']}, returns={self.call['returns']}, rope={self.call['rope']['source']}"


class FusedOutputRemainder(nn.Module):
    """A fused output projection whose attention columns ``[a, b)`` moved into the MM-DiM.

    The block still feeds it ``cat([attention, other])``; the attention part now arrives already
    projected (width ``out_features``) and is added as is: ``y = x[a:b] + W_rest · x[rest] + bias``.
    """

    def __init__(self, in_features: int, out_features: int, columns: tuple[int, int], bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        a, b = columns
        if b - a != out_features:
            raise ValueError(f"columns [{a}, {b}) must be {out_features} wide")
        self.in_features, self.out_features, self.columns = in_features, out_features, (a, b)
        self.weight = nn.Parameter(torch.empty(out_features, in_features - (b - a), device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, columns: tuple[int, int]) -> "FusedOutputRemainder":
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, columns, linear.bias is not None,
                  device=w.device, dtype=w.dtype)
        a, b = columns
        mod.weight.copy_(torch.cat([w[:, :a], w[:, b:]], dim=1))
        if linear.bias is not None:
            mod.bias.copy_(linear.bias)
        return mod

    def forward(self, x):
        a, b = self.columns
        rest = torch.cat([x[..., :a], x[..., b:]], dim=-1)
        return x[..., a:b] + F.linear(rest, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, attention_columns={self.columns}"


def call_spec(spec: RecipeFile, module: nn.Module) -> dict:
    """How a replacement reads the original module's call (recorded per layer in the config)."""
    sig = inspect.signature(module.forward)
    names = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    t, r = spec.tokens, spec.rope
    return {
        "arg_names": names, "video_arg": spec.attention.video_arg, "layout": t.layout,
        "text_arg": t.text.name if t.layout == "joint" else None, "returns": list(spec.attention.returns),
        "rope": {"source": r.source if r else "none", "name": r.name if r else None,
                 "span": r.span if r else "head"},
    }


# ============================================================================ the swap


@dataclass
class GenericAttentionToMMDiM:
    """Swap config: the recipe, the model config and the checked layers to convert."""

    spec: RecipeFile
    config: dict
    mmdim: dict
    layers: dict  # fqn → LayerInfo (geometry filled in)
    model: nn.Module | None = None  # the model being converted (weights of fused projections live outside)


@register_handler(GenericAttentionToMMDiM)
def _generic_attn_to_mmdim(attn: nn.Module, fqn: str, config: GenericAttentionToMMDiM) -> nn.Module:
    info = config.layers[fqn]
    cfg = MMDiMConfig(d_model=info.d_model, nheads=info.heads, headdim=info.head_dim, layer_index=info.index,
                      **config.mmdim)
    weights = attention_weights(config.model, info)
    w = weights.q_weight
    block = mmdim_from_attention(cfg, weights, device=w.device, dtype=w.dtype)
    return GenericMMDiMAttention(block, call_spec(config.spec, attn))


class GenericConvertedMixin(ConvertedModelMixin):
    """Mixed in before a diffusers model class by :func:`converted_class` (see the module docstring)."""

    _m4v_spec: RecipeFile
    _m4v_base: type  # the diffusers class
    converted_types = (GenericMMDiMAttention,)

    # ---------------------------------------------------------------- setup

    def _init_m4v(self, m4v: dict, spec: RecipeFile | None = None, recipe_raw: dict | None = None) -> None:
        if spec is None:
            recipe = m4v.get("recipe_spec")
            if recipe is None:
                raise CheckpointError(f"{type(self).__name__}: config has no m4v.recipe_spec; convert with m4v-convert")
            spec = RecipeFile.model_validate(recipe)
        self._init_spec(spec)

    def _init_spec(self, spec: RecipeFile) -> None:
        """Hooks and call context for the layers ``spec`` describes."""
        self._m4v_spec = spec
        self._m4v_context = GenericCallContext()
        self._m4v_hooks = []
        t, r = spec.tokens, spec.rope
        if t.text.source == "module_output":
            self._m4v_hooks.append(self._hook_output(t.text.module, t.text.index, "text", "tokens.text.module"))
        if r is not None and r.source == "module_output":
            self._m4v_hooks.append(self._hook_output(r.module, None, "rotary", "rope.module"))
        self._m4v_forward_sig = inspect.signature(self._m4v_base.forward)

    def _hook_output(self, path: str, index, attr: str, what: str):
        module = get_module(self, path)
        if module is None:
            raise RecipeError(f"{what}: the model has no submodule {path!r}")
        ctx = self._m4v_context

        def hook(m, args, output):
            setattr(ctx, attr, output[index] if index is not None else output)

        return module.register_forward_hook(hook)

    def _new_record(self, teacher: nn.Module, spec: RecipeFile, recipe_raw: dict) -> dict:
        return {"generic": True, "base_class": type(teacher).__name__, "recipe_spec": recipe_raw, "layers": {}}

    def _build_converted(self, m4v: dict) -> None:
        for index, entry in sorted((m4v.get("layers") or {}).items(), key=lambda kv: int(kv[0])):
            block = MMDiM(MMDiMConfig.from_dict(entry["mmdim"]))
            _set_module(self, entry["fqn"], GenericMMDiMAttention(block, entry["call"]))
            fo = entry.get("fused_out")
            if fo:
                _set_module(self, fo["fqn"], FusedOutputRemainder(fo["in_features"], fo["out_features"],
                                                                  tuple(fo["columns"]), fo["bias"]))

    # ---------------------------------------------------------------- conversion

    def convert_(self, layers: list[LayerInfo], mmdim: dict, meta: dict | None = None) -> list[str]:
        """Replace the given (checked) layers by MM-DiM initialized from them. An output projection
        fused with other outputs keeps its other columns (:class:`FusedOutputRemainder`)."""
        wanted = {info.fqn: info for info in layers}
        swap = GenericAttentionToMMDiM(spec=self._m4v_spec, config=dict(self.config), mmdim=dict(mmdim),
                                       layers=wanted, model=self)
        fused = {}
        for info in layers:  # read the fused layers before the swap; replace them after it
            if info.fused_out:
                fused[info.fqn] = (info.out[0], info.out[1], self.get_submodule(info.out[0]))
        replaced = self._swap_modules(swap, set(wanted))
        entries = dict((self.config.get("m4v") or {}).get("layers") or {})
        for info in layers:
            entry = {"fqn": info.fqn, "mmdim": self.get_submodule(info.fqn).mmdim.config.to_dict(),
                     "call": self.get_submodule(info.fqn).call, "fused_out": None}
            if info.fqn in fused:
                out_fqn, cols, linear = fused[info.fqn]
                _set_module(self, out_fqn, FusedOutputRemainder.from_linear(linear, cols))
                entry["fused_out"] = {"fqn": out_fqn, "columns": list(cols), "in_features": linear.in_features,
                                      "out_features": linear.out_features, "bias": linear.bias is not None}
            entries[str(info.index)] = entry
        self._finish_conversion(entries, meta)
        return replaced

    def converted_modules(self) -> dict[int, nn.Module]:
        return {int(k): self.get_submodule(e["fqn"])
                for k, e in ((self.config.get("m4v") or {}).get("layers") or {}).items()}

    # ---------------------------------------------------------------- forward

    def _m4v_forward(self, *args, **kwargs):
        spec = self._m4v_spec
        bound = self._m4v_forward_sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        call = bound.arguments
        ctx = self._m4v_context
        ctx.layout = grid_layout(spec, dict(self.config), call)
        ctx.text_mask = text_mask_from_call(spec, call)
        if spec.tokens.text.source == "forward_arg":
            ctx.text = call.get(spec.tokens.text.name)
        try:
            return self._m4v_base.forward(self, *args, **kwargs)
        finally:
            ctx.clear()


def _set_module(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


_CLASSES: dict[str, type] = {}


def converted_class(base_name: str) -> type:
    """``M4V<base_name>``: the diffusers class with :class:`GenericConvertedMixin`, built once.

    Its ``__init__`` takes the base class's arguments plus ``m4v`` (the conversion record) and its
    ``forward`` has the base class's signature, so diffusers' ``from_pretrained``/``save_pretrained``
    and pipelines that inspect ``transformer.forward`` work unchanged.
    """
    if base_name in _CLASSES:
        return _CLASSES[base_name]
    base = diffusers_class(base_name)
    base_forward = base.forward

    def forward(self, *args, **kwargs):
        return GenericConvertedMixin._m4v_forward(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(base_forward)
    forward.__doc__ = base_forward.__doc__
    name = CONVERTED_PREFIX + base_name
    cls = type(name, (GenericConvertedMixin, base), {
        "__init__": converted_init(base), "forward": forward, "_m4v_base": base, "__module__": __name__,
        "__doc__": f"{base_name} with attention layers replaced by MM-DiM (m4v-convert generic)."})
    _CLASSES[base_name] = cls
    return cls


def converted_class_for_config(cfg: dict) -> type | None:
    """The class a saved config.json needs, when it is a generic conversion."""
    m4v = cfg.get("m4v") or {}
    name = cfg.get("_class_name", "")
    if not m4v.get("generic") or not name.startswith(CONVERTED_PREFIX):
        return None
    return converted_class(m4v.get("base_class") or name[len(CONVERTED_PREFIX):])


# ============================================================================ distillation support


def selected_infos(model: nn.Module, spec: RecipeFile, config: dict, mmdim: dict, indices: list[int],
                   where: str = "recipe") -> list[LayerInfo]:
    infos = {i.index: i for i in find_layers(model, spec, where)}
    missing = [i for i in indices if i not in infos]
    if missing:
        raise M4VError(f"--layers: {missing} are not attention layers of this recipe (layers: "
                       f"{sorted(infos)})")
    return [layer_geometry(model, infos[i], spec, config, mmdim, where) for i in indices]


@torch.no_grad()
def record_teacher_layers(teacher: nn.Module, batch: dict, infos: list[LayerInfo]) -> dict[int, LayerRecord]:
    """Run ``teacher`` (a converted-class model, here with its original attention) on ``batch``; return,
    per layer, the attention's video input/output and the context an MM-DiM in its place needs."""
    spec: RecipeFile = teacher._m4v_spec
    ctx: GenericCallContext = teacher._m4v_context
    records: dict[int, LayerRecord] = {}
    pre_out: dict[int, torch.Tensor] = {}
    handles = []

    def tap(info: LayerInfo):
        call = call_spec(spec, info.module)

        def hook(module, args, kwargs, output):
            bound = dict(zip(call["arg_names"], args))
            bound.update(kwargs)
            video = bound[call["video_arg"]]
            text = bound.get(call["text_arg"]) if call["layout"] == "joint" else ctx.text
            outs = output if isinstance(output, tuple) else (output,)
            out = outs[call["returns"].index("video")]
            raw = bound.get(call["rope"]["name"]) if call["rope"]["source"] == "call_arg" else ctx.rotary
            rotary = rope_tables(raw, call["rope"]["span"], info.heads, info.head_dim, ctx.layout.num_tokens)
            if info.fused_out:  # target: the attention's contribution through its columns of the fused layer
                pre_out[info.index] = out.detach()
                a, b = info.out[1]
                out = F.linear(out, teacher.get_submodule(info.out[0]).weight[:, a:b])
            mask = ctx.text_mask if text is not None else None
            records[info.index] = LayerRecord(video.detach(), out.detach(), {
                "layout": ctx.layout, "text": None if text is None else text.detach(), "text_mask": mask,
                "rotary": rotary})
        return hook

    def tap_out(info: LayerInfo):
        def hook(module, args, output):
            x = args[0]
            lz = 0 if spec.tokens.layout != "joint" else x.shape[1] - ctx.layout.num_tokens
            if spec.tokens.layout == "joint":
                x = x[:, lz:] if spec.tokens.text_order == "first" else x[:, :x.shape[1] - lz]
            pre_out[info.index] = x.detach()
        return hook

    for info in infos:
        handles.append(info.module.register_forward_hook(tap(info), with_kwargs=True))
        if not info.fused_out:
            handles.append(teacher.get_submodule(info.out[0]).register_forward_hook(tap_out(info)))
    try:
        teacher(**batch, return_dict=False)
    finally:
        for h in handles:
            h.remove()
    missing = [i.index for i in infos if i.index not in records]
    if missing:
        raise M4VError(f"layers {missing} were not called during the teacher's forward")
    for index, rec in records.items():
        rec.pre_out = pre_out.get(index)
    return records


def latent_channels(spec: RecipeFile, config: dict) -> int:
    """Channels of one clean latent (C of (C, F, H, W)); a BNC model's in_channels count a whole patch."""
    c = resolve_size(spec.inputs.in_channels, config, what="inputs.in_channels")
    if spec.grid.layout == "BNC":
        p = [resolve_size(getattr(spec.grid.patch, k), config, what=f"grid.patch.{k}") for k in "thw"]
        c //= p[0] * p[1] * p[2]
    return c


def patch_sizes(spec: RecipeFile, config: dict) -> tuple[int, int, int]:
    return tuple(resolve_size(getattr(spec.grid.patch, k), config, what=f"grid.patch.{k}") for k in "thw")


def model_inputs(batch: dict, spec: RecipeFile, config: dict) -> dict:
    """A calibration batch (``hidden_states`` (b, C, F, H, W), ``timestep``, ``encoder_hidden_states``
    with zero padding rows) → keyword arguments of the model's forward, per ``grid`` and ``inputs``."""
    g, inp = spec.grid, spec.inputs
    x = batch["hidden_states"]
    kwargs = {}
    if g.layout == "BFCHW":
        x = x.permute(0, 2, 1, 3, 4)
    elif g.layout == "BNC":
        b, c, f, h, w = x.shape
        pt, ph, pw = patch_sizes(spec, config)
        x = x.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        x = x.flatten(4, 7).flatten(1, 3)
        kwargs.update({g.args.frames: f // pt, g.args.height: h // ph, g.args.width: w // pw})
    text = batch["encoder_hidden_states"]
    kwargs.update({g.input: x, inp.timestep: batch["timestep"], inp.text: text})
    if inp.text_mask:
        kwargs[inp.text_mask] = text.ne(0).any(-1)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(0)
    for name, extra in inp.extra.items():
        shape = [n] + [resolve_size(s, config, what=f"inputs.extra.{name}.shape") for s in extra.shape]
        if extra.fill == "randn":
            t = torch.randn(shape, generator=gen)
        elif extra.fill in ("zeros", "ones"):
            t = torch.zeros(shape) if extra.fill == "zeros" else torch.ones(shape)
        else:
            t = torch.full(shape, float(extra.fill))
        kwargs[name] = t.to(device=x.device, dtype=x.dtype)
    return kwargs
