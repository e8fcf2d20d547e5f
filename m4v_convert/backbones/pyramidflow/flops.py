"""FLOPs of PyramidFlow miniFLUX before and after conversion, set beside the M4V paper's figures.

Conventions are those of :mod:`m4v_convert.flops.analytic` (a multiply-add is 2 FLOPs, one batch
item, matmul-like work only; softmax, norms, RoPE and other elementwise work are not counted;
the block-causal mask is not exploited: attention scores are counted dense, ``4·N²·d``).

**Where** (DESIGN §5): the single-stream blocks at one model call of the *last autoregressive
unit* of a video, top pyramid stage. At 768×1280×241 that is 31 latent frames; the last unit
denoises frame 30 with 30 history frames laid out by the release rule (28 at level 0, one at
level 1, one at level 2), so ``N = 128 text + 28·240 + 960 + 3840 + 3840 = 15,488`` tokens.

**What**, per single-stream block (``d`` width, ``m`` MLP width):

* *attention sub-layer*: Q/K/V plus the attention columns of ``proj_out`` (``8·N·d²``) and the
  scores (``4·N²·d``) — versus the MM-DiM replacing it (:func:`analytic.mmdim_flops`, over
  ``N' = N_video + 2·Lz + T + 1``), with the temporal branch and without it ("pure Mamba");
* *whole block* ("mixed-layer FLOPs", the paper's figure): the sub-layer plus ``proj_mlp`` and
  the MLP columns of ``proj_out`` (``4·N·d·m``) and the AdaLN modulation (``6·d²``, per item).
  The converted block's ``proj_out`` keeps only the MLP columns and its W_O lives in the
  mixer's ``out_proj`` (see :mod:`m4v_convert.backbones.pyramidflow.converted`), so nothing is
  counted twice.

**Whole generation** (summed over every model call): the release's default schedule
(``generate(..., num_inference_steps=[20, 20, 20], video_num_inference_steps=[10, 10, 10])`` in
its README and scripts; one latent frame per unit): unit 0 is the first frame, no history,
20 steps at each of the 3 stages; each later unit ``u`` has ``u`` history frames and 10 steps
per stage. Classifier-free guidance runs the conditional and unconditional inputs as a batch of
2, which doubles every count (``with_cfg``).
"""

from __future__ import annotations

import dataclasses

from m4v_convert.flops.analytic import MAC, attention_flops, linear_flops, mmdim_flops
from m4v_convert.layers.mmdim import MMDiMConfig
from m4v_convert.layers.recompose import FrameBlock, VideoLayout

VAE_TEMPORAL = 8  # PyramidFlow's causal VAE: 8x in time (first frame kept)
VAE_SPATIAL = 8
PATCH = 2
NUM_STAGES = 3
MLP_RATIO = 4
TEXT_LEN = 128  # the release pads T5 to 128 tokens
# Release sizes: 768p makes up to 241 frames (temp 31); 384p up to 121 (temp 16, "5s").
RESOLUTIONS = {"768p": (768, 1280, 241), "384p": (384, 640, 121)}
SCHEDULE = {"first_frame_steps": [20, 20, 20], "unit_steps": [10, 10, 10], "frame_per_unit": 1, "cfg_batch": 2,
            "source": "jy0205/Pyramid-Flow README and scripts: generate(num_inference_steps=[20, 20, 20], "
                      "video_num_inference_steps=[10, 10, 10]); pyramid_dit_for_video_gen_pipeline.py generate()"}
PAPER = {
    "setting": "PyramidFlow miniFLUX, 768x1280, 241 frames, last autoregressive unit, the 16 single-stream blocks",
    "mixed_layer_original_tflops": 55.44,
    "mixed_layer_converted_tflops": 29.52,
    "mixed_layer_pure_mamba_tflops": 26.64,
    "inference_seconds_original": 812,
    "inference_seconds_converted": 613,
}
T = 1e12


def latent_frames(frames: int) -> int:
    if frames < 1 or (frames - 1) % VAE_TEMPORAL:
        raise ValueError(f"frames: PyramidFlow makes 8k+1 frames (1, 9, ..., 241), got {frames}")
    return 1 + (frames - 1) // VAE_TEMPORAL


def token_grids(height: int, width: int, num_stages: int = NUM_STAGES) -> list[tuple[int, int]]:
    """Token grid ``(H, W)`` of each pyramid level, 0 (lowest) … top."""
    step = VAE_SPATIAL * PATCH * 2 ** (num_stages - 1)
    if height < step or width < step or height % step or width % step:
        raise ValueError(f"size {height}x{width}: height and width must be positive multiples of {step} "
                         f"(VAE {VAE_SPATIAL}x, 2x2 patches, {num_stages} pyramid levels)")
    top = (height // (VAE_SPATIAL * PATCH), width // (VAE_SPATIAL * PATCH))
    return [(top[0] >> (num_stages - 1 - lv), top[1] >> (num_stages - 1 - lv)) for lv in range(num_stages)]


def stage_layout(stage: int, num_history: int, grids: list[tuple[int, int]]) -> VideoLayout:
    """The video part of one stage's sequence (history by the release rule, then 1 noisy frame);
    registers are the pyramid levels, as the converted model uses them."""
    from m4v_convert.backbones.pyramidflow.layout import history_clips  # noqa: PLC0415 (pure function)

    blocks = [FrameBlock(f, *grids[lv], lv) for f, lv in history_clips(stage, num_history)]
    blocks.append(FrameBlock(1, *grids[stage], stage))
    return VideoLayout(tuple(blocks))


def miniflux_dims(config: dict) -> dict:
    """Widths and block counts of a PyramidFlow config (miniFLUX; SD3: joint blocks only)."""
    heads, hd = int(config.get("num_attention_heads", 30)), int(config.get("attention_head_dim", 64))
    d = heads * hd
    sd3 = config.get("_class_name") in ("PyramidDiffusionMMDiT", "M4VPyramidDiffusionMMDiT")
    return {"d_model": d, "heads": heads, "head_dim": hd, "mlp": MLP_RATIO * d,
            "num_double": int(config.get("num_layers", 24 if sd3 else 8)),
            "num_single": 0 if sd3 else int(config.get("num_single_layers", 16)),
            "variant": "sd3" if sd3 else "miniflux"}


def single_block_flops(dims: dict, layout: VideoLayout, text_len: int, mmdim: MMDiMConfig) -> dict:
    """One single-stream block, original and converted (with / without the temporal branch)."""
    d, m = dims["d_model"], dims["mlp"]
    n = text_len + layout.num_tokens
    attn = attention_flops(n, d, dims["heads"], dims["head_dim"])
    mlp = linear_flops(n, d, m) + linear_flops(n, m, d)
    modulation = linear_flops(1, d, 3 * d)
    return _block_row(n, attn["projections"], attn["scores"], mmdim, layout, text_len, mlp, modulation)


def _block_row(tokens: int, projections: int, scores: int, mmdim: MMDiMConfig, layout: VideoLayout, text_len: int,
               mlp: int, modulation: int) -> dict:
    """One block's counts: its attention (projections + scores) or the MM-DiM in its place (with and
    without the temporal branch), plus the unchanged MLP and modulation."""
    mm = mmdim_flops(mmdim, layout, text_len)
    pure = mmdim_flops(dataclasses.replace(mmdim, temporal=False), layout, text_len)
    return {
        "tokens": tokens,
        "attention_flops": projections + scores,
        "attention_projections": projections,
        "attention_scores": scores,
        "mmdim_flops": mm["total"],
        "mmdim_matmul_flops": mm["matmul"],
        "mmdim_pure_flops": pure["total"],
        "mmdim_parts": dict(mm["parts"]),
        "mmdim_sequence_length": mm["shape"]["sequence_length"],
        "mlp_flops": mlp,
        "modulation_flops": modulation,
        "block_original_flops": projections + scores + mlp + modulation,
        "block_converted_flops": mm["total"] + mlp + modulation,
        "block_pure_mamba_flops": pure["total"] + mlp + modulation,
    }


def double_block_flops(dims: dict, layout: VideoLayout, text_len: int, mmdim: MMDiMConfig,
                       context_pre_only: bool = False) -> dict:
    """One double-stream / joint block, original and with its attention converted (MM-DiM with
    text projections): joint attention + the video and text 4x MLPs + two AdaLN-Zero. A
    context-pre-only block (SD3's last) has no text MLP and no text out-projection; its converted
    form still runs ``text_out_proj`` on the text rows (counted)."""
    d, m = dims["d_model"], dims["mlp"]
    n_video = layout.num_tokens
    n = text_len + n_video
    attn = attention_flops(n, d, dims["heads"], dims["head_dim"])
    projections, scores = attn["projections"], attn["scores"]
    if context_pre_only:
        projections -= linear_flops(text_len, d, d)
    ff = linear_flops(n_video if context_pre_only else n, d, m) + linear_flops(n_video if context_pre_only else n, m, d)
    modulation = linear_flops(1, d, 6 * d) + linear_flops(1, d, (2 if context_pre_only else 6) * d)
    return _block_row(n, projections, scores, mmdim, layout, text_len, ff, modulation)


def _config_key(mc: MMDiMConfig) -> tuple:
    return tuple(sorted((k, v) for k, v in dataclasses.asdict(mc).items() if k not in ("layer_index", "extra")))


def _block_sums(dims, layout, text_len, mmdim_for, converted: set[int], kinds=("single",)) -> dict:
    """Sums over the blocks of ``kinds`` ("double", "single") at one call: original, converted,
    pure Mamba (unconverted blocks count as original in every column)."""
    totals = {"original": 0, "converted": 0, "pure_mamba": 0, "attention_original": 0, "attention_converted": 0,
              "attention_pure_mamba": 0}
    rows = []
    cache: dict = {}
    nd = dims["num_double"]
    indices = [*(range(nd) if "double" in kinds else ()), *(range(nd, nd + dims["num_single"]) if "single" in kinds
                                                            else ())]
    for index in indices:
        mc = mmdim_for(index)
        pre_only = dims["variant"] == "sd3" and index == nd - 1
        key = (index < nd, pre_only, _config_key(mc))
        if key not in cache:  # the zigzag path changes no count
            cache[key] = (double_block_flops(dims, layout, text_len, mc, pre_only) if index < nd
                          else single_block_flops(dims, layout, text_len, mc))
        c = cache[key]
        conv = index in converted
        totals["original"] += c["block_original_flops"]
        totals["converted"] += c["block_converted_flops"] if conv else c["block_original_flops"]
        totals["pure_mamba"] += c["block_pure_mamba_flops"] if conv else c["block_original_flops"]
        totals["attention_original"] += c["attention_flops"]
        totals["attention_converted"] += c["mmdim_flops"] if conv else c["attention_flops"]
        totals["attention_pure_mamba"] += c["mmdim_pure_flops"] if conv else c["attention_flops"]
        rows.append({"index": index, "kind": "double" if index < nd else "single", "converted": conv, **c})
    return {"totals": totals, "layers": rows}


def _mixed_layer(dims, layout, text_len, mmdim_for, converted: set[int]) -> dict:
    """Sums over the single-stream blocks at one call (the paper's "mixed layers")."""
    return _block_sums(dims, layout, text_len, mmdim_for, converted, ("single",))


def pyramidflow_flops_report(config: dict, frames: int, height: int, width: int, *, text_len: int = TEXT_LEN,
                             converted_layers=None, mmdim: dict | None = None, name: str | None = None,
                             crosscheck: bool = False) -> dict:
    """The FLOPs report for a PyramidFlow config (see the module docstring for what is counted).

    ``converted_layers``: global layer indices (default: all single-stream blocks; SD3: all joint
    blocks); ``mmdim``: the recipe's MM-DiM settings. Keys shared with the Wan report:
    ``original_total_flops``, ``converted_total_flops``, ``layers`` (``index``, ``attention_flops``,
    ``mmdim_flops``, ...), ``tokens``, ``video``. Their scope (``scope``) is the single-stream blocks
    ("mixed layers", the paper's figure) when only those are converted, and every block when a
    double-stream / joint block is converted too. ``crosscheck``: also measure one teacher and one
    converted single-stream block at the last-unit layout with FlopCounterMode on the meta device
    (:func:`crosscheck_single_block`; not run for double-stream blocks).
    """
    dims = miniflux_dims(config)
    nd, ns = dims["num_double"], dims["num_single"]
    default = range(nd, nd + ns) if ns else range(nd)
    converted = set(default) if converted_layers is None else set(converted_layers)
    bad = sorted(i for i in converted if not 0 <= i < nd + ns)
    if bad:
        raise ValueError(f"converted_layers: {bad} are not blocks of this model (0-{nd + ns - 1})")
    mmdim = dict(mmdim or {})
    kinds = ("double", "single") if any(i < nd for i in converted) else ("single",)

    def mmdim_for(index: int) -> MMDiMConfig:
        return MMDiMConfig(d_model=dims["d_model"], nheads=dims["heads"], headdim=dims["head_dim"],
                           layer_index=index, **{**mmdim, "text_projections": index < nd})

    def scope_sums(layout: VideoLayout) -> dict:
        return _block_sums(dims, layout, text_len, mmdim_for, converted, kinds)

    units = latent_frames(frames)
    grids = token_grids(height, width)
    top = NUM_STAGES - 1
    last_layout = stage_layout(top, units - 1, grids)
    last = scope_sums(last_layout)
    mixed = _mixed_layer(dims, last_layout, text_len, mmdim_for, converted)["totals"]
    doubles = _block_sums(dims, last_layout, text_len, mmdim_for, converted, ("double",))["totals"]
    tokens = text_len + last_layout.num_tokens
    # every frame but the one being denoised (the last block) is conditional history
    noisy = last_layout.blocks[-1]
    history_tokens = last_layout.num_tokens - noisy.num_frames * noisy.height * noisy.width

    # whole generation: every unit, stage and step
    gen = {"original": 0, "converted": 0, "pure_mamba": 0, "model_calls": 0}
    for u in range(units):
        steps = SCHEDULE["first_frame_steps"] if u == 0 else SCHEDULE["unit_steps"]
        for stage in range(NUM_STAGES):
            t = scope_sums(stage_layout(stage, u, grids))["totals"]
            for k in ("original", "converted", "pure_mamba"):
                gen[k] += steps[stage] * t[k]
            gen["model_calls"] += steps[stage]
    cfg_batch = SCHEDULE["cfg_batch"]
    generation = {
        "units": units, "model_calls": gen["model_calls"],
        "per_sample": {k: gen[k] for k in ("original", "converted", "pure_mamba")},
        "with_cfg": {k: cfg_batch * gen[k] for k in ("original", "converted", "pure_mamba")},
        "schedule": SCHEDULE,
    }
    tot = last["totals"]
    if crosscheck:
        rows_, ok = [], True
        singles = sorted(i for i in converted if i >= nd)
        doubles_conv = sorted(i for i in converted if i < nd)
        if ns:
            c = crosscheck_single_block(config, last_layout, text_len, mmdim, layer_index=singles[0] if singles else nd)
            rows_, ok = rows_ + c["rows"], ok and c["ok"]
        if doubles_conv:
            c = crosscheck_double_block(config, last_layout, text_len, mmdim, layer_index=doubles_conv[0])
            rows_, ok = rows_ + c["rows"], ok and c["ok"]
        check = {"rows": rows_, "ok": ok}
    else:
        check = {"skipped": "crosscheck=False"}
    ours = {"mixed_layer_original_tflops": mixed["original"] / T,
            "mixed_layer_converted_tflops": mixed["converted"] / T,
            "mixed_layer_pure_mamba_tflops": mixed["pure_mamba"] / T}
    comparable = (frames, height, width) == (241, 768, 1280) and (dims["d_model"], nd, ns) == (1920, 8, 16)
    temporal = temporal_branch_vs_paper(dims, tokens, history_tokens, mixed) if comparable else None
    # FLOPs vs frames at the last unit (Wan's "curve"): one analytic pass per 8k+1 frame count
    curve_frames = sorted({1 + VAE_TEMPORAL * (u - 1) for u in range(1, units + 1, max(1, units // 16))} | {frames})
    curve = {"frames": curve_frames, "original": [], "converted": []}
    for f in curve_frames:
        t = tot if f == frames else scope_sums(stage_layout(top, latent_frames(f) - 1, grids))["totals"]
        curve["original"].append(t["original"])
        curve["converted"].append(t["converted"])
    curve["crossover_frames"] = next((f for f, o, c in zip(curve_frames, curve["original"], curve["converted"])
                                      if c < o), None)
    scope_blocks = "all blocks" if "double" in kinds else "single-stream blocks"
    curve.update(height=height, width=width, scope=f"{scope_blocks} at the last unit")
    rows = last["layers"]
    scores = sum(r["attention_scores"] for r in rows)
    top_grid = grids[top]
    return {
        "name": name or f"PyramidFlow {dims['variant']}",
        "backbone": "pyramidflow",
        "variant": dims["variant"],
        "scope": ("single-stream blocks (mixed layers)" if "double" not in kinds else
                  "all blocks (double-stream / joint blocks are converted too)")
                 + " at the last autoregressive unit, top stage, batch 1",
        "video": {"frames": frames, "height": height, "width": width},
        "latent_frames": units,
        "token_grids": [list(g) for g in grids],
        "layout": [{"num_frames": b.num_frames, "height": b.height, "width": b.width, "level": b.register}
                   for b in last_layout.blocks],
        "tokens": tokens,
        "video_tokens": last_layout.num_tokens,
        "text_len": text_len,
        "model": {"num_double_layers": nd, "num_single_layers": ns, **{k: dims[k] for k in
                                                                       ("d_model", "heads", "head_dim", "mlp")}},
        "converted_layers": sorted(converted),
        "mmdim_config": mmdim_for(nd).to_dict(),
        "layers": last["layers"],
        "original_total_flops": tot["original"],
        "converted_total_flops": tot["converted"],
        "pure_mamba_total_flops": tot["pure_mamba"],
        "attention_sublayer": {"original": tot["attention_original"], "converted": tot["attention_converted"],
                               "pure_mamba": tot["attention_pure_mamba"]},
        "mixed_layer": {"original": mixed["original"], "converted": mixed["converted"],
                        "pure_mamba": mixed["pure_mamba"]},
        "double_stream": {"original": doubles["original"], "converted": doubles["converted"],
                          "pure_mamba": doubles["pure_mamba"]},
        "double_stream_blocks_flops": doubles["converted"],
        "all_blocks": {"original": doubles["original"] + mixed["original"],
                       "converted": doubles["converted"] + mixed["converted"]},
        "generation": generation,
        "paper": PAPER,
        "paper_comparable": comparable,
        "temporal_branch_vs_paper": temporal,
        "ours_vs_paper": {k: {"ours": v, "paper": PAPER[k], "ratio": v / PAPER[k]} for k, v in ours.items()},
        "notes": counting_notes(dims, tokens, mixed, temporal) if comparable else [
            f"The paper's figures are for the full-size miniFLUX at 768x1280, 241 frames ({PAPER['setting']}); "
            f"this report is for {frames} frames at {height}x{width} with d={dims['d_model']}, {nd}+{ns} blocks, "
            "so they are listed for reference only."],
        "crosscheck": check,
        # keys of the Wan report, same meanings (scope: the single-stream blocks at the last unit)
        "speedup": tot["original"] / tot["converted"],
        "latent": {"frames": units, "height": top_grid[0] * PATCH, "width": top_grid[1] * PATCH},
        "token_grid": {"frames": units, "height": top_grid[0], "width": top_grid[1]},
        "self_attention": {"projections": sum(r["attention_projections"] for r in rows),
                           "scores": scores,
                           "total": tot["attention_original"]},
        "ffn_flops": sum(r["mlp_flops"] for r in rows),
        "attention_scores_total_flops": scores,
        "converted_total_matmul_flops": sum(
            r["block_converted_flops"] - (r["mmdim_flops"] - r["mmdim_matmul_flops"]) if r["converted"]
            else r["block_original_flops"] for r in rows),
        "curve": curve,
        "crossover_frames": curve["crossover_frames"],
    }


def temporal_branch_vs_paper(dims: dict, tokens: int, history_tokens: int, tot: dict) -> dict:
    """The temporal branch's FLOPs, ours and the paper's (converted − pure Mamba), and the paper's
    expressed as full-width (d×d, ``2·d²`` FLOPs) projections per token and per history token in
    each block: how wide a branch its figure implies."""
    paper = (PAPER["mixed_layer_converted_tflops"] - PAPER["mixed_layer_pure_mamba_tflops"]) * T
    projection = MAC * dims["d_model"] ** 2 * dims["num_single"]
    return {"paper_flops": paper, "ours_flops": tot["converted"] - tot["pure_mamba"],
            "tokens": tokens, "history_tokens": history_tokens,
            "paper_projections_per_token": paper / (projection * tokens),
            "paper_projections_per_history_token": paper / (projection * history_tokens)}


def counting_notes(dims: dict, tokens: int, tot: dict, tb: dict) -> list[str]:
    """Why our numbers and the paper's differ (computed, not asserted)."""
    d, m, n_blocks = dims["d_model"], dims["mlp"], dims["num_single"]
    # tokens N at which 16 blocks of 8·N·d² + 4·N²·d + 4·N·d·m + 6·d² reach the paper's figure
    target = PAPER["mixed_layer_original_tflops"] * T / n_blocks
    a, b, c = 4 * d, 8 * d * d + 4 * d * m, 6 * d * d - target
    n_match = (-b + (b * b - 4 * a * c) ** 0.5) / (2 * a)
    paper_temporal, ours_temporal = tb["paper_flops"], tb["ours_flops"]
    per_token, per_history_token = tb["paper_projections_per_token"], tb["paper_projections_per_history_token"]
    return [
        "Counting: 2 FLOPs per multiply-add, matmuls only (no softmax, norms, RoPE, gating), dense attention "
        "scores (the block-causal mask is not exploited), batch 1, one model call.",
        f"Original mixed layers: ours {tot['original'] / T:.2f} vs paper {PAPER['mixed_layer_original_tflops']} "
        f"TFLOPs ({tot['original'] / T / PAPER['mixed_layer_original_tflops'] - 1:+.1%}). With our rule the "
        f"paper's figure corresponds to N ≈ {n_match:,.0f} tokens instead of {tokens:,}. The paper states "
        "neither its token count nor its counting rule, so the gap is not explained here; counting the "
        "elementwise work (softmax ≈ 5·heads·N² per block) would add only "
        f"{n_blocks * 5 * dims['heads'] * tokens * tokens / T:.2f} TFLOPs.",
        f"Converted: our MM-DiM ({tot['converted'] / T:.2f} TFLOPs with the temporal branch, "
        f"{tot['pure_mamba'] / T:.2f} pure Mamba) follows this implementation: the in/out projections over "
        "N' = N_video + 2·Lz + T + 1 tokens, the identity-initialized depthwise conv, the chunked SSD scan "
        "(chunk 256) and the recipe's temporal branch (grid² · dim channels per frame). Without the temporal "
        f"branch ours is {tot['pure_mamba'] / T / PAPER['mixed_layer_pure_mamba_tflops'] - 1:+.1%} from the "
        "paper's pure-Mamba figure, about the same relative gap as the original blocks.",
        f"Temporal branch: the paper's costs {paper_temporal / T:.2f} TFLOPs over {n_blocks} blocks, ours "
        f"{ours_temporal / T:.3f}. Ours pools each frame to grid² regions before any projection, so its cost "
        f"grows with the number of frames, not tokens. The paper's figure equals {per_token:.2f} full-width "
        f"(d×d) projections of every one of the {tokens:,} tokens per block, or {per_history_token:.2f} of "
        f"each of the {tb['history_tokens']:,} history tokens that feed the branch: a branch working per token at "
        "full width (e.g. an input and an output projection of each history token), which the paper does "
        "not describe further. The difference is the branch's design, not the counting rule.",
    ]


def crosscheck_single_block(config: dict, layout: VideoLayout, text_len: int, mmdim: dict | None = None,
                            device="meta", layer_index: int | None = None) -> dict:
    """Build one teacher single-stream block and its converted replacement (on ``meta`` by default:
    no memory at full size), run them on ``layout`` under FlopCounterMode, and compare with
    :func:`single_block_flops`. The converted block's analytic side is its matmul part (the conv
    and the state passing are elementwise in the code; FlopCounterMode does not see them).

    Returns ``{"rows": [compare rows], "ok": bool, "analytic": ..., "measured": {...}}``.
    """
    import torch  # noqa: PLC0415
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock  # noqa: PLC0415

    from m4v_convert.backbones.pyramidflow.attention import PyramidFlowAttnProcessor  # noqa: PLC0415
    from m4v_convert.backbones.pyramidflow.converted import MMDiMSingleTransformerBlock  # noqa: PLC0415
    from m4v_convert.backbones.pyramidflow.layout import (  # noqa: PLC0415
        attention_mask, rope_tables, sequence_position_ids, stage_layout as pyramid_stage_layout)
    from m4v_convert.flops.measured import compare, measure_flop_counts  # noqa: PLC0415

    dims = miniflux_dims(config)
    d = dims["d_model"]
    index = dims["num_double"] if layer_index is None else layer_index
    mc = MMDiMConfig(d_model=d, nheads=dims["heads"], headdim=dims["head_dim"], layer_index=index, **(mmdim or {}))
    analytic = single_block_flops(dims, layout, text_len, mc)
    top = max(b.register for b in layout.blocks)
    shapes = [(b.num_frames, b.height, b.width) for b in layout.blocks]
    stage = pyramid_stage_layout(shapes, torch.ones(1, text_len, dtype=torch.bool), stage_level=top)
    cos, sin = rope_tables(sequence_position_ids(stage), config.get("axes_dims_rope", (16, 24, 24)))
    args = (torch.zeros(1, layout.num_tokens, d, device=device), torch.zeros(1, text_len, d, device=device),
            torch.zeros(1, d, device=device))
    kwargs = {"image_rotary_emb": (cos.to(device), sin.to(device)),
              "joint_attention_kwargs": {"attention_mask": attention_mask(stage, device=device),
                                         "token_layout": stage}}
    with torch.device(device):
        teacher = FluxSingleTransformerBlock(d, dims["heads"], dims["head_dim"])
        teacher.attn.set_processor(PyramidFlowAttnProcessor())
        student = MMDiMSingleTransformerBlock(d, dims["mlp"], mc)
    measured_teacher = sum(measure_flop_counts(teacher, *args, **kwargs)[""].values())
    counts = measure_flop_counts(student, *args, **kwargs)
    measured_student = sum(counts[""].values())
    # What runs off-GPU is the PyTorch scan at its own chunk (the report counts the Triton kernel's
    # chunk). The depthwise conv is counted apart: FlopCounterMode sees it only when the mixer runs
    # it as a library convolution (then over the padded sequence, 2·(L'+k−1)·C·k).
    from m4v_convert.flops.measured import _ops_sum, as_run_config  # noqa: PLC0415

    run_config = as_run_config(mc)
    chunk = run_config.chunk_size
    run = mmdim_flops(run_config, layout, text_len)
    mix = mc.mixer_config()
    conv_measured = _ops_sum(counts, "", "conv")
    conv_analytic = MAC * (run["shape"]["sequence_length"] + mix.d_conv - 1) * mix.conv_dim * mix.d_conv
    rows = [compare("single_block.original", analytic["block_original_flops"], measured_teacher),
            compare("single_block.converted", run["matmul"] + analytic["mlp_flops"] + analytic["modulation_flops"],
                    measured_student - conv_measured,
                    note=f"MM-DiM matmuls at the PyTorch scan's chunk ({chunk}) + MLP + modulation; the conv and "
                         "the state passing are counted apart")]
    if conv_measured:
        rows.append(compare("single_block.conv1d", conv_analytic, conv_measured,
                            note="library depthwise conv over the padded sequence"))
    return {"rows": rows, "ok": not any(r["flagged"] for r in rows), "analytic": analytic,
            "measured": {"original": measured_teacher, "converted": measured_student}}


def crosscheck_double_block(config: dict, layout: VideoLayout, text_len: int, mmdim: dict | None = None,
                            device="meta", layer_index: int = 0) -> dict:
    """As :func:`crosscheck_single_block`, for double-stream / joint block ``layer_index`` (the
    release's block class, built from ``config``) and the same block with its attention converted."""
    import copy  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from m4v_convert.backbones.pyramidflow.converted import PyramidMMDiMJointAttention  # noqa: PLC0415
    from m4v_convert.backbones.pyramidflow.layout import (  # noqa: PLC0415
        attention_mask, frame_index, rope_tables, sequence_position_ids, stage_layout as pyramid_stage_layout)
    from m4v_convert.backbones.pyramidflow.loader import build_pyramidflow  # noqa: PLC0415
    from m4v_convert.flops.measured import _ops_sum, as_run_config, compare, measure_flop_counts  # noqa: PLC0415
    from m4v_convert.layers.mmdim import MMDiM  # noqa: PLC0415

    dims = miniflux_dims(config)
    d, nd = dims["d_model"], dims["num_double"]
    if not 0 <= layer_index < nd:
        raise ValueError(f"layer_index {layer_index}: not a double-stream block (0-{nd - 1})")
    pre_only = dims["variant"] == "sd3" and layer_index == nd - 1
    mc = MMDiMConfig(d_model=d, nheads=dims["heads"], headdim=dims["head_dim"], layer_index=layer_index,
                     **{**(mmdim or {}), "text_projections": True})
    analytic = double_block_flops(dims, layout, text_len, mc, pre_only)
    top = max(b.register for b in layout.blocks)
    shapes = [(b.num_frames, b.height, b.width) for b in layout.blocks]
    stage = pyramid_stage_layout(shapes, torch.ones(1, text_len, dtype=torch.bool), stage_level=top)
    if dims["variant"] == "sd3":
        cos, sin = rope_tables(frame_index(stage)[:, None].double(), [dims["head_dim"]])
    else:
        cos, sin = rope_tables(sequence_position_ids(stage), config.get("axes_dims_rope", (16, 24, 24)))
    context = {"attention_mask": attention_mask(stage, device=device), "token_layout": stage,
               "image_rotary_emb": (cos.to(device), sin.to(device))}
    args = (torch.zeros(1, layout.num_tokens, d, device=device), torch.zeros(1, text_len, d, device=device),
            torch.zeros(1, d, device=device))
    if dims["variant"] == "sd3":
        kwargs = {"joint_attention_kwargs": context}
    else:
        kwargs = {"image_rotary_emb": context.pop("image_rotary_emb"), "joint_attention_kwargs": context}
    teacher = build_pyramidflow(config, device=device).transformer_blocks[layer_index]
    student = copy.deepcopy(teacher)
    with torch.device(device):
        student.attn = PyramidMMDiMJointAttention(MMDiM(mc), context_pre_only=pre_only)
    measured_teacher = sum(measure_flop_counts(teacher, *args, **kwargs)[""].values())
    counts = measure_flop_counts(student, *args, **kwargs)
    measured_student = sum(counts[""].values())
    run = mmdim_flops(as_run_config(mc), layout, text_len)
    conv_measured = _ops_sum(counts, "", "conv")
    rows = [compare("double_block.original", analytic["block_original_flops"], measured_teacher),
            compare("double_block.converted", run["matmul"] + analytic["mlp_flops"] + analytic["modulation_flops"],
                    measured_student - conv_measured,
                    note=f"MM-DiM matmuls at the PyTorch scan's chunk ({as_run_config(mc).chunk_size}) + MLPs + "
                         "modulation; the conv and the state passing are counted apart")]
    return {"rows": rows, "ok": not any(r["flagged"] for r in rows), "analytic": analytic,
            "measured": {"original": measured_teacher, "converted": measured_student}}


def markdown_report(report: dict) -> str:
    v = report["video"]
    tf = lambda x: f"{x / T:.3f}"  # noqa: E731
    lines = [f"# FLOPs report: {report['name']}", "",
             f"Video {v['frames']} frames × {v['height']}×{v['width']} px → {report['latent_frames']} latent frames; "
             f"last autoregressive unit, top stage: {report['video_tokens']:,} video + {report['text_len']} text = "
             f"{report['tokens']:,} tokens. Token grids per level: {report['token_grids']}.",
             f"Scope: {report['scope']}. Converted layers: {report['converted_layers']}.", "",
             f"## {report['curve']['scope'][0].upper() + report['curve']['scope'][1:]} (TFLOPs)", "",
             "| | original | converted (MM-DiM + temporal) | pure Mamba (no temporal) |", "|---|---:|---:|---:|"]
    a, mx, ds = report["attention_sublayer"], report["mixed_layer"], report["double_stream"]
    nd, ns = report["model"]["num_double_layers"], report["model"]["num_single_layers"]
    doubles_converted = any(r["kind"] == "double" and r["converted"] for r in report["layers"])
    lines.append(f"| attention sub-layers of these blocks | {tf(a['original'])} | {tf(a['converted'])} | "
                 f"{tf(a['pure_mamba'])} |")
    if ns:
        lines.append(f"| single-stream blocks, whole (mixed-layer FLOPs) | {tf(mx['original'])} | "
                     f"{tf(mx['converted'])} | {tf(mx['pure_mamba'])} |")
        p = report["paper"]
        label = "paper, mixed-layer FLOPs" + ("" if report.get("paper_comparable") else
                                              " (768x1280x241; not this setting)")
        lines.append(f"| {label} | {p['mixed_layer_original_tflops']} | "
                     f"{p['mixed_layer_converted_tflops']} | {p['mixed_layer_pure_mamba_tflops']} |")
    ab = report["all_blocks"]
    if doubles_converted:
        lines.append(f"| double-stream / joint blocks ({nd}), whole | {tf(ds['original'])} | {tf(ds['converted'])} | "
                     f"{tf(ds['pure_mamba'])} |")
        lines += ["", f"All blocks: {tf(ab['original'])} → {tf(ab['converted'])} TFLOPs (the totals, the curve and "
                      "the whole-generation sums cover every block).", ""]
    else:
        lines += ["", f"With the {nd} unchanged double-stream blocks ({tf(ds['original'])} TFLOPs): all blocks "
                      f"{tf(ab['original'])} → {tf(ab['converted'])} TFLOPs.", ""]
    cross = report["crossover_frames"]
    where = (f"cost less from {cross} frame{'s' if cross != 1 else ''} on" if cross
             else "never cost less over the frame counts tried")
    lines += [f"Converted scope {report['speedup']:.2f}× cheaper at this size; at the last unit the converted blocks "
              f"{where} (`curve` in the JSON).", ""]
    g = report["generation"]
    lines += [f"## Whole generation (all units, stages and steps; TFLOPs, {report['curve']['scope'].split(' at ')[0]})",
              "",
              f"{g['units']} units, {g['model_calls']} model calls (first frame {g['schedule']['first_frame_steps']}, "
              f"later units {g['schedule']['unit_steps']} steps per stage).", "",
              "| | original | converted | pure Mamba |", "|---|---:|---:|---:|"]
    for k in ("per_sample", "with_cfg"):
        r = g[k]
        lines.append(f"| {k.replace('_', ' ')} | {tf(r['original'])} | {tf(r['converted'])} | {tf(r['pure_mamba'])} |")
    lines += ["", "## Per layer (last unit, TFLOPs)", "",
              "| layer | converted | attention | MM-DiM | MM-DiM pure | block original | block converted |",
              "|---:|:---:|---:|---:|---:|---:|---:|"]
    for r in report["layers"]:
        lines.append(f"| {r['index']} | {'yes' if r['converted'] else 'no'} | {tf(r['attention_flops'])} | "
                     f"{tf(r['mmdim_flops'])} | {tf(r['mmdim_pure_flops'])} | {tf(r['block_original_flops'])} | "
                     f"{tf(r['block_converted_flops'])} |")
    lines += ["", "## Against the paper", ""] + [f"- {n}" for n in report["notes"]]
    cc = report.get("crosscheck") or {}
    lines += ["", "## Cross-check against FlopCounterMode (one block, meta device)", ""]
    if "rows" in cc:
        lines += ["| component | analytic | measured | rel. diff | note |", "|---|---:|---:|---:|---|"]
        lines += [f"| {r['component']} | {r['analytic']:,} | {r['measured']:,} | {r['rel_diff']:.2e} | "
                  f"{r.get('note') or r.get('explanation') or ''} |" for r in cc["rows"]]
    else:
        lines.append(f"Not run ({cc.get('skipped', 'no cross-check in the report')}).")
    return "\n".join(lines) + "\n"


__all__ = ["PAPER", "RESOLUTIONS", "SCHEDULE", "crosscheck_double_block", "crosscheck_single_block", "double_block_flops", "latent_frames", "markdown_report",
           "pyramidflow_flops_report", "single_block_flops", "stage_layout", "token_grids"]
