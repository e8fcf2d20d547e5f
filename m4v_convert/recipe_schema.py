"""The recipe schema: pydantic models of every section a recipe YAML may hold.

``m4v_convert.recipes.load_recipe`` validates a file against :class:`RecipeFile` and turns each
pydantic error into one line naming the file, the line, the field path and what was expected.
Sections shared by every backbone (``video``, ``calib``, ``distill``, ``published``, ``mmdim``)
are here next to the sections of ``backbone: generic`` (``model``, ``attention``, ``tokens``,
``grid``, ``rope``, ``inputs``, ``pipeline``), which describe a diffusers video DiT the toolkit has no code for.
``docs/recipes.md`` is the reference a recipe writer reads; keep the two in step.

Everything here is checked from the YAML alone. What needs the model's module tree (patterns
that match nothing, Q/K/V shapes vs heads, slices out of range) is checked against a meta-device
model by ``m4v_convert.backbones.generic.conversion.check_recipe`` before any weight is read.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

Number = Union[StrictInt, StrictFloat]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
PosInt = Annotated[StrictInt, Field(ge=1)]
NonNegNumber = Annotated[Number, Field(ge=0)]
PosNumber = Annotated[Number, Field(gt=0)]
Bounds = Annotated[list[Union[StrictInt, StrictStr]], Field(min_length=2, max_length=2)]  # [start, end)

# A size in a recipe: an int, a config key ("config.patch_size", "config.patch_size[1]") or, for
# slices of fused projections, a multiple of the attention's width ("inner", "2*inner", "d_model").
SIZE_RE = re.compile(r"^config\.[A-Za-z_][A-Za-z0-9_]*(\[\d+\])?$")
SLICE_RE = re.compile(r"^\s*(?:(\d+)\s*\*\s*)?(inner|d_model)\s*$")
# Attribute paths from an attention module: "to_q", "to_out.0", "../proj_out" (from its parent).
PATH_RE = re.compile(r"^(\.\./)*[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=False)


# ------------------------------------------------------------------------------------ shared sections


class Video(Strict):
    temporal_compression: PosInt  # VAE: latent frames = (frames - 1) / temporal_compression + 1
    spatial_compression: PosInt  # VAE: latent pixels per side
    text_len: PosInt  # text tokens at full size (FLOPs report)
    # generic backbones: the video size of the FLOPs report written next to a conversion
    report_frames: PosInt | None = None
    report_height: PosInt | None = None
    report_width: PosInt | None = None


class Calib(Strict):
    latent_frames: PosInt
    latent_height: PosInt
    latent_width: PosInt
    text_len: PosInt
    flow_shift: NonNegNumber | None = None
    num_samples: PosInt | None = None
    batch_size: PosInt | None = None
    eval_batches: PosInt | None = None  # held-out batches for the before/after errors: at least one
    seed: NonNegInt | None = None
    teacher_steps: NonNegInt | None = None  # --teacher-calib: Euler steps per teacher sample
    teacher_first_frame_steps: PosInt | None = None  # PyramidFlow: those of the first latent frame
    corrupt_ratio: NonNegNumber | None = None  # PyramidFlow: history corruption σ_c ~ U(0, corrupt_ratio)


class StageBase(Strict):
    steps: NonNegInt | None = None
    lr: PosNumber | None = None
    weight_decay: NonNegNumber | None = None
    grad_clip: NonNegNumber | None = None
    batch_size: PosInt | None = None
    checkpoint_every: NonNegInt | None = None


class Stage2(StageBase):
    feature_weight: NonNegNumber | None = None
    output_weight: NonNegNumber | None = None
    # share of batches whose inputs are states of the student's own sampling (distill/job.py), and that
    # sampler's Euler steps
    on_policy: Annotated[Number, Field(ge=0, le=1)] | None = None
    on_policy_steps: PosInt | None = None


class Distill(Strict):
    stage1: StageBase | None = None
    stage2: Stage2 | None = None
    stage3: StageBase | None = None
    stages: StrictStr | StrictInt | list[StrictInt | StrictStr] | None = None
    train: StrictStr | None = None
    lora_rank: PosInt | None = None
    lora_alpha: NonNegNumber | None = None
    layer_groups: PosInt | None = None  # --layer-groups: train the converted layers in this many groups in turn
    grad_checkpointing: StrictBool | None = None  # --grad-checkpointing / --no-grad-checkpointing

    @model_validator(mode="after")
    def _values(self):
        if self.stages is not None:
            raw = self.stages
            items = raw if isinstance(raw, list) else str(raw).replace(" ", "").split(",")
            if not items or any(str(s) not in ("1", "2", "3") for s in items):
                raise _field_error("stages", f"must list stages among 1, 2, 3 (e.g. '1,2,3'), got {raw!r}")
        if self.train is not None:
            from m4v_convert.distill.params import TRAIN_MODES

            if self.train not in TRAIN_MODES:
                raise _field_error("train", f"must be one of {list(TRAIN_MODES)}, got {self.train!r}")
        return self


# ------------------------------------------------------------------------------------ generic backbone


class Model(Strict):
    """Which diffusers class the checkpoint holds and how it lies on disk."""

    class_name: StrictStr = Field(alias="class")  # e.g. CogVideoXTransformer3DModel
    subfolder: StrictStr | None = None  # None: the folder itself, else its transformer/ subfolder
    single_file: StrictBool = False  # --checkpoint may be one .safetensors file (diffusers from_single_file)


class Projection(Strict):
    """A linear layer of the attention; ``rows`` / ``columns`` slice a fused one."""

    path: StrictStr
    rows: Bounds | None = None  # fused QKV: output features [a, b)
    columns: Bounds | None = None  # fused output: input features [a, b)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data):
        return {"path": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _check(self):
        if not PATH_RE.match(self.path):
            raise _field_error("path", f"must be an attribute path like 'to_q', 'to_out.0' or '../proj_out', "
                                       f"got {self.path!r}")
        for name in ("rows", "columns"):
            bounds = getattr(self, name)
            if bounds is None:
                continue
            for b in bounds:
                if isinstance(b, str) and not SLICE_RE.match(b):
                    raise _field_error(name, f"bounds must be ints or 'inner', 'N*inner', 'd_model', got {b!r}")
                if isinstance(b, int) and b < 0:
                    raise _field_error(name, f"bounds must be >= 0, got {b}")
        if self.rows is not None and self.columns is not None:
            raise _field_error("columns", "give rows (fused QKV) or columns (fused output), not both")
        return self


class Norm(Strict):
    path: StrictStr
    kind: Literal["rms_norm", "layer_norm"] = "rms_norm"  # layer_norm: only its weight is carried

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data):
        return {"path": data} if isinstance(data, str) else data


class Attention(Strict):
    """Which modules are the attention layers to replace and where their weights are."""

    pattern: StrictStr  # regex, full match on module names; group 1 (if any) = layer number
    module_class: list[StrictStr] | None = Field(default=None, alias="class")  # expected class names
    heads: StrictInt | StrictStr  # int, "config.KEY" or "module.ATTR" (attribute of the attention)
    head_dim: StrictInt | StrictStr | None = None  # default: width of Q / heads
    q: Projection
    k: Projection
    v: Projection
    out: Projection
    q_norm: Norm | None = None
    k_norm: Norm | None = None
    # what the original module returns, in order: "video" (one tensor) or a pair
    returns: list[Literal["video", "text"]] = Field(default_factory=lambda: ["video"])
    video_arg: StrictStr = "hidden_states"  # call argument holding the video tokens

    @model_validator(mode="after")
    def _check(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise _field_error("pattern", f"is not a valid regular expression ({e})") from None
        for name in ("heads", "head_dim"):
            v = getattr(self, name)
            if isinstance(v, int) and v < 1:
                raise _field_error(name, f"must be >= 1, got {v}")
            if isinstance(v, str) and not (SIZE_RE.match(v) or re.match(r"^module\.[A-Za-z_]\w*$", v)):
                raise _field_error(name, f"must be an int, 'config.KEY' or 'module.ATTR', got {v!r}")
        if self.returns not in (["video"], ["video", "text"], ["text", "video"]):
            raise _field_error("returns", f"must be [video], [video, text] or [text, video], got {self.returns}")
        if self.out.rows is not None:
            raise _field_error("out", "the output projection is sliced by columns, not rows")
        for name in ("q", "k", "v"):
            if getattr(self, name).columns is not None:
                raise _field_error(name, "Q/K/V projections are sliced by rows (output features), not columns")
        return self


class Source(Strict):
    """Where a per-call input of the replaced attention comes from."""

    source: Literal["none", "call_arg", "forward_arg", "module_output", "zero_rows"]
    name: StrictStr | None = None  # call_arg / forward_arg / zero_rows: the argument name
    module: StrictStr | None = None  # module_output: submodule path of the model
    index: NonNegInt | None = None  # module_output: element of a tuple output

    @model_validator(mode="after")
    def _check(self):
        if self.source in ("call_arg", "forward_arg", "zero_rows") and not self.name:
            raise _field_error("name", f"source '{self.source}' needs the argument's name")
        if self.source == "module_output" and not self.module:
            raise _field_error("module", "source 'module_output' needs the submodule's path")
        return self


class Stream(Strict):
    name: StrictStr
    q: Projection
    k: Projection
    v: Projection
    out: Projection


class Tokens(Strict):
    """How the attention's sequence is laid out."""

    layout: Literal["video_only", "joint", "streams"]
    text_order: Literal["first", "last"] | None = None  # joint: text before or after the video
    text: Source = Field(default_factory=lambda: Source(source="none"))
    text_mask: Source = Field(default_factory=lambda: Source(source="none"))
    streams: list[Stream] | None = None  # layout streams: per-stream projections (not convertible yet)

    @model_validator(mode="after")
    def _check(self):
        if self.layout == "joint" and self.text_order is None:
            raise _field_error("text_order", "layout 'joint' needs text_order: first or last")
        if self.layout != "joint" and self.text_order is not None:
            raise _field_error("text_order", f"is only used by layout 'joint', not {self.layout!r}")
        if self.text.source == "zero_rows":
            raise _field_error("text.source", "zero_rows describes a mask; text comes from call_arg, forward_arg "
                                              "or module_output")
        if self.text_mask.source in ("call_arg", "module_output"):
            raise _field_error("text_mask.source", "a text mask comes from none, zero_rows or forward_arg")
        if self.layout == "joint" and self.text.source != "call_arg":
            raise _field_error("text.source", "joint attention reads the text from the attention call "
                                              "(source: call_arg, name: encoder_hidden_states)")
        if self.layout == "video_only" and self.text.source == "call_arg":
            raise _field_error("text.source", "video_only attention is not given the text; take it from a "
                                              "module_output (e.g. the text projection) or a forward_arg")
        if self.layout == "streams" and not self.streams:
            raise _field_error("streams", "layout 'streams' needs the list of streams and their projections")
        return self


class Patch(Strict):
    t: StrictInt | StrictStr = 1
    h: StrictInt | StrictStr = 1
    w: StrictInt | StrictStr = 1

    @model_validator(mode="after")
    def _check(self):
        for name in ("t", "h", "w"):
            v = getattr(self, name)
            if isinstance(v, str) and not SIZE_RE.match(v):
                raise _field_error(name, f"must be an int or 'config.KEY' / 'config.KEY[i]', got {v!r}")
            if isinstance(v, int) and v < 1:
                raise _field_error(name, f"must be >= 1, got {v}")
        return self


class GridArgs(Strict):
    frames: StrictStr
    height: StrictStr
    width: StrictStr


class Grid(Strict):
    """How the frame grid is read off the model's input at each forward call."""

    input: StrictStr = "hidden_states"  # forward argument holding the latents
    layout: Literal["BCFHW", "BFCHW", "BNC"]  # BNC: already patchified tokens (grid from `args`)
    patch: Patch = Field(default_factory=Patch)
    args: GridArgs | None = None  # BNC: forward arguments holding the token grid (frames, height, width)

    @model_validator(mode="after")
    def _check(self):
        if self.layout == "BNC" and self.args is None:
            raise _field_error("args", "layout BNC needs the forward arguments that hold the token grid "
                                       "(args: {frames, height, width})")
        return self


class Rope(Strict):
    source: Literal["none", "call_arg", "module_output"] = "none"
    name: StrictStr | None = None  # call_arg: the attention's keyword holding (cos, sin)
    module: StrictStr | None = None  # module_output: submodule returning (cos, sin)
    pairs: Literal["interleaved"] = "interleaved"  # (x[2i], x[2i+1]) rotated together, cos/sin repeat-interleaved
    span: Literal["head", "all_heads"] = "head"  # one table shared by heads, or one across heads·head_dim

    @model_validator(mode="after")
    def _check(self):
        if self.source == "call_arg" and not self.name:
            raise _field_error("name", "source 'call_arg' needs the attention keyword (e.g. image_rotary_emb)")
        if self.source == "module_output" and not self.module:
            raise _field_error("module", "source 'module_output' needs the submodule's path (e.g. rope)")
        return self


class ExtraInput(Strict):
    shape: list[StrictInt | StrictStr] = Field(default_factory=list)  # per sample; ints or 'config.KEY'
    fill: Literal["zeros", "ones", "randn"] | Number = "zeros"


class Inputs(Strict):
    """How calibration batches map onto the forward's arguments (distillation)."""

    in_channels: StrictInt | StrictStr = "config.in_channels"
    text_dim: StrictInt | StrictStr
    timestep: StrictStr = "timestep"
    text: StrictStr = "encoder_hidden_states"
    text_mask: StrictStr | None = None  # forward argument taking the (batch, text_len) mask
    # text tokens the model takes exactly (int or 'config.KEY'), e.g. CogVideoX without RoPE adds
    # position embeddings to max_text_seq_length text tokens; None: any length (calib.text_len)
    text_len: StrictInt | StrictStr | None = None
    extra: dict[StrictStr, ExtraInput] = Field(default_factory=dict)


class Pipeline(Strict):
    """The diffusers pipeline of a pipeline folder (``--prompts``): one whose ``encode_prompt(prompt,
    negative_prompt, do_classifier_free_guidance, max_sequence_length, device)`` returns (embeddings,
    negative embeddings) and whose ``__call__`` takes them and ``output_type="latent"``, as WanPipeline."""

    class_name: StrictStr = Field(alias="class")  # e.g. CogVideoXPipeline (model_index.json's _class_name)
    max_sequence_length: StrictInt | StrictStr | None = None  # encode_prompt's (int or 'config.KEY')
    guidance_scale: NonNegNumber | None = None  # --guidance-scale's default (the pipeline's own)
    negative_prompt: StrictStr = ""  # for prompts that bring none
    prompts_refused: StrictStr | None = None  # why --prompts is not offered for this pipeline

    @model_validator(mode="after")
    def _check(self):
        if self.prompts_refused is None:
            for key in ("max_sequence_length", "guidance_scale"):
                if getattr(self, key) is None:
                    raise _field_error(key, "needed to sample the teacher from --prompts (or say why not in "
                                            "prompts_refused)")
        return self


# ------------------------------------------------------------------------------------ the file


class RecipeFile(Strict):
    name: StrictStr
    description: StrictStr
    backbone: Literal["wan", "pyramidflow", "generic"]
    default_layers: StrictStr | StrictInt
    published: dict[StrictStr, StrictStr] | None = None
    video: Video | None = None
    mmdim: dict | None = None  # MMDiMConfig fields, checked against the dataclass
    calib: Calib | None = None
    distill: Distill | None = None
    # pyramidflow only
    variant: Literal["miniflux", "sd3"] | None = None
    resolution: Literal["384p", "768p"] | None = None
    allow_double_stream: StrictBool | None = None
    # generic only
    model: Model | None = None
    attention: Attention | None = None
    tokens: Tokens | None = None
    grid: Grid | None = None
    rope: Rope | None = None
    inputs: Inputs | None = None
    pipeline: Pipeline | None = None

    @model_validator(mode="before")
    @classmethod
    def _published_keys(cls, data):
        # YAML reads `1.3b:` as a string but `14:` as an int; published names are strings
        if isinstance(data, dict) and isinstance(data.get("published"), dict):
            data = dict(data)
            data["published"] = {str(k): v for k, v in data["published"].items()}
        return data

    @model_validator(mode="after")
    def _backbone_fields(self):
        """The fields a backbone's registry entry says are its own, or required by it."""
        from m4v_convert.backbones import registry

        for entry in registry.entries():
            if entry.name == self.backbone:
                continue
            for key in entry.recipe_fields:
                if _given(self, key):
                    raise _field_error(key, f"is only used by backbone '{entry.name}'")
        for key in registry.get(self.backbone).recipe_required:
            if getattr(self, key) is None:
                allowed = _literal_values(type(self).model_fields[key].annotation)
                what = f"this field (one of {list(allowed)})" if allowed else "this section (see docs/recipes.md)"
                raise _field_error(key, f"backbone '{self.backbone}' needs {what}")
        return self


def _given(model: BaseModel, dotted: str) -> bool:
    """Whether the recipe sets the field at ``dotted`` (``calib.corrupt_ratio``: the section's field)."""
    *sections, name = dotted.split(".")
    for section in sections:
        model = getattr(model, section, None)
        if model is None:
            return False
    return name in model.model_fields_set


def _literal_values(annotation) -> tuple:
    """The values of a ``Literal[...] | None`` field (empty for any other type)."""
    for arg in get_args(annotation) or (annotation,):
        if get_origin(arg) is Literal:
            return get_args(arg)
    return ()


class FieldError(ValueError):
    """A validator's complaint about one field (relative to the model being validated)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _field_error(field: str, message: str) -> ValueError:
    # pydantic wraps a ValueError raised in a validator; the loader reads .field back out of ctx
    return FieldError(field, message)
