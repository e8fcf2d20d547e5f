"""FLOPs accounting: hand counts, analytic vs FlopCounterMode, Wan2.1-1.3B reference numbers, report."""

import json

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from m4v_convert.backbones.wan.flops import (
    build_wan_flops_report, crosscheck_wan, flops_vs_frames, wan_latent_grid, wan_model_flops,
)
from m4v_convert.flops.analytic import attention_flops, mmdim_flops, mmdim_sequence_length, ssd_chunked_flops
from m4v_convert.flops.measured import compare, crosscheck_mmdim, measure_flop_counts, measure_flops, mmdim_component_rows
from m4v_convert.flops.report import format_tflops, write_flops_report
from m4v_convert.layers.mmdim import MMDiM, MMDiMConfig
from m4v_convert.layers.recompose import FrameBlock, Recomposer, VideoLayout
from m4v_convert.ops.ssd_chunked import ssd_scan_chunked

# Wan2.1-1.3B, written out here so the tests do not depend on recipes/.
WAN_1_3B = {
    "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 12,
    "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
    "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
}
TINY_WAN = {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4,
            "out_channels": 4, "text_dim": 24, "freq_dim": 16, "ffn_dim": 48, "num_layers": 3}
TINY_MMDIM = {"chunk_size": 8, "temporal_dim": 8, "temporal_heads": 2}


class HandAttention(nn.Module):
    def __init__(self, d, heads, head_dim):
        super().__init__()
        self.h, self.hd = heads, head_dim
        self.q, self.k, self.v = (nn.Linear(d, heads * head_dim) for _ in range(3))
        self.o = nn.Linear(heads * head_dim, d)

    def forward(self, x, ctx=None):
        ctx = x if ctx is None else ctx
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.hd).transpose(1, 2)
        k = self.k(ctx).view(b, ctx.shape[1], self.h, self.hd).transpose(1, 2)
        v = self.v(ctx).view(b, ctx.shape[1], self.h, self.hd).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / self.hd ** 0.5, dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, n, -1))


# ----------------------------------------------------------------------------- attention

def test_attention_hand_count_n10_d8():
    n, d, heads, hd = 10, 8, 2, 4
    got = attention_flops(n, d, heads, hd)
    # Q, K, V, O: 4 linears of 10 rows, 8x8, 2 FLOPs per multiply-add; QK^T and PV: 2 x (10 x 10 x 8) MACs
    assert got["projections"] == 4 * 2 * 10 * 8 * 8 == 5120
    assert got["scores"] == 2 * 2 * 10 * 10 * 8 == 3200
    assert got["total"] == 8320
    total, per_module = measure_flops(HandAttention(d, heads, hd), torch.randn(1, n, d))
    assert total == got["total"]
    assert sum(per_module[k] for k in ("q", "k", "v", "o")) == got["projections"]


def test_attention_inner_width_and_cross_attention():
    n, nk, d, heads, hd = 6, 5, 12, 3, 2  # inner width 6 != d
    self_attn = attention_flops(n, d, heads, hd)
    assert self_attn["projections"] == 8 * n * d * heads * hd
    assert self_attn["scores"] == 4 * n * n * heads * hd
    cross = attention_flops(n, d, heads, hd, kv_tokens=nk)
    assert cross["projections"] == 2 * n * d * 6 * 2 + 2 * 2 * nk * d * 6
    assert cross["scores"] == 4 * n * nk * 6
    total, _ = measure_flops(HandAttention(d, heads, hd), torch.randn(1, n, d), torch.randn(1, nk, d))
    assert total == cross["total"]


def test_measure_flops_names_match_named_modules():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 2)))
    total, per_module = measure_flops(model, torch.randn(5, 4))
    assert total == 2 * 5 * (4 * 3 + 3 * 2)
    assert per_module["0"] == 2 * 5 * 4 * 3 and per_module["2.0"] == 2 * 5 * 3 * 2
    assert set(per_module) <= {name for name, _ in model.named_modules()}


# ----------------------------------------------------------------------------- SSD scan

@pytest.mark.parametrize("seqlen,chunk,heads,groups,p,n",
                         [(21, 8, 4, 2, 3, 5), (6, 16, 2, 2, 4, 4), (16, 4, 2, 1, 2, 3)])
def test_ssd_chunked_matmuls_match_flop_counter(seqlen, chunk, heads, groups, p, n):
    x = torch.randn(1, seqlen, heads, p)
    dt = torch.rand(1, seqlen, heads)
    A = -torch.rand(heads)
    B, C = torch.randn(1, seqlen, groups, n), torch.randn(1, seqlen, groups, n)
    with FlopCounterMode(display=False) as fc:
        ssd_scan_chunked(x, dt, A, B, C, chunk_size=chunk, D=torch.ones(heads))
    got = ssd_chunked_flops(seqlen, heads, p, groups, n, chunk)
    q = min(chunk, seqlen)
    nc = -(-seqlen // q)
    assert got["shape"]["padded_length"] == nc * q  # the implementation pads the last chunk
    # hand count: C.B^T per group, scores.x per head, chunk states, output from states (all x2)
    hand = 2 * nc * (groups * q * q * n + heads * q * q * p + 2 * q * heads * p * n)
    matmul = sum(v for k, v in got["parts"].items() if k != "state_passing")
    assert matmul == hand == fc.get_total_flops()


# ----------------------------------------------------------------------------- MM-DiM

MMDIM_VARIANTS = [
    dict(),
    dict(text_sandwich=False, registers=False, temporal=False),
    dict(ngroups=1, d_state=6, bc_norm="per_group", rotary=False),
    dict(temporal_causal=False, conv_activation="silu", out_norm=False, chunk_size=5),
    dict(bidirectional=True, temporal_causal=False),
    dict(bidirectional=True, out_norm=False, chunk_size=5, temporal=False),
    dict(scan="time"),  # time-major: a permutation, the same counts
    dict(scan="alternate", layer_index=1, bidirectional=True, temporal_causal=False),
    dict(temporal_queries="tokens", temporal_grid=3),  # every token queries every frame's regions
    dict(temporal_queries="tokens", temporal_causal=False, bidirectional=True),
]


@pytest.mark.parametrize("extra", MMDIM_VARIANTS)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_mmdim_analytic_matches_flop_counter(extra, device):
    cfg = MMDiMConfig(d_model=16, nheads=2, headdim=8, **{**TINY_MMDIM, **extra})
    layout = VideoLayout((FrameBlock(2, 3, 4, 0), FrameBlock(1, 2, 2, 0)))
    text_len = 5
    with torch.device(device):
        block = MMDiM(cfg)
    video = torch.randn(1, layout.num_tokens, 16, device=device)
    text = torch.randn(1, text_len, 16, device=device)
    counts = measure_flop_counts(block, video, layout, text)
    analytic = mmdim_flops(cfg, layout, text_len)
    rows = {r["component"]: r for r in mmdim_component_rows(analytic, counts, "", "m")}
    for name in ("m.in_proj", "m.out_proj", "m.ssd_scan", "m.matmul_total"):
        assert rows[name]["measured"] == rows[name]["analytic"], name  # linear parts and the scan: exact
    if cfg.temporal:
        linears = ("qkv",) if cfg.temporal_queries == "frames" else ("q_proj", "kv_proj")
        for name in ("down_proj", *linears, "attn_out", "up_proj", "attention"):
            assert rows[f"m.temporal_{name}"]["rel_diff"] == 0.0, name
            assert rows[f"m.temporal_{name}"]["measured"] > 0, name
    # conv and state passing are real multiply-adds that FlopCounterMode cannot see: flagged, explained
    assert rows["m.conv1d"]["flagged"] and rows["m.conv1d"]["explanation"].startswith("the depthwise")
    p = analytic["parts"]
    assert analytic["total"] == analytic["matmul"] + p["conv1d"] + p["ssd_state_passing"]
    assert analytic["elementwise_total"] > 0 and "elementwise" not in analytic["parts"]


def test_mmdim_sequence_length_matches_recomposer():
    layout = VideoLayout.single(3, 4, 5)
    for sandwich in (True, False):
        for registers in (True, False):
            cfg = MMDiMConfig(d_model=8, nheads=2, headdim=4, text_sandwich=sandwich, registers=registers)
            for time_major in (False, True):
                rc = Recomposer(layout, 0, registers=registers, text_sandwich=sandwich, time_major=time_major)
                assert mmdim_sequence_length(cfg, layout, 7) == rc.sequence_length(7)
                assert rc.forward(torch.zeros(1, layout.num_tokens, 2), torch.zeros(1, 2),
                                  torch.zeros(1, 7, 2) if sandwich else None).shape[1] == rc.sequence_length(7)
    cfg = MMDiMConfig(d_model=8, nheads=2, headdim=4)
    assert mmdim_sequence_length(cfg, layout, 7) == 60 + 2 * 7 + 3 + 1


def test_compare_flags_above_two_percent():
    assert not compare("x", 102, 100)["flagged"]
    row = compare("x", 103, 100)
    assert row["flagged"] and row["explanation"].startswith("unexplained")
    assert compare("y", 0, 0)["rel_diff"] == 0.0


# ----------------------------------------------------------------------------- Wan2.1

def test_wan_1_3b_reference_numbers():
    r = wan_model_flops(WAN_1_3B, 81, 480, 832, text_len=512)
    n, d = 32760, 1536
    assert wan_latent_grid(WAN_1_3B, 81, 480, 832) == (21, 30, 52)
    assert r["latent"] == {"frames": 21, "height": 60, "width": 104}
    assert r["tokens"] == n
    assert len(r["layers"]) == 30
    for lay in r["layers"]:
        assert lay["attention_scores"] == 4 * n * n * d
        assert lay["attention_projections"] == 8 * n * d * d
    assert abs(r["original_total_flops"] / 283e12 - 1) < 0.02
    # DESIGN §5: "~201 of it in attention scores" = self-attention scores + cross-attention scores
    scores = r["attention_scores_total_flops"] + 30 * r["cross_attention"]["scores"]
    assert abs(scores / 201e12 - 1) < 0.02
    assert r["converted_total_flops"] == r["original_total_flops"]  # nothing converted


def test_wan_converted_counts_swap_only_the_selected_layers():
    r = wan_model_flops(WAN_1_3B, 81, 480, 832, converted_layers=[0, 29])
    lay0, lay1 = r["layers"][0], r["layers"][1]
    assert lay0["converted"] and not lay1["converted"]
    delta = 2 * (lay0["attention_flops"] - lay0["mmdim_flops"])
    assert r["original_total_flops"] - r["converted_total_flops"] == delta
    cfg = MMDiMConfig(d_model=1536, nheads=12, headdim=128)
    layout = VideoLayout.single(21, 30, 52)
    assert lay0["mmdim_flops"] == mmdim_flops(cfg, layout, 512)["total"]
    assert lay0["mmdim_sequence_length"] == 32760 + 2 * 512 + 21 + 1
    # recipe hyper-parameters reach the count (a bigger chunk means more intra-chunk work)
    big = wan_model_flops(WAN_1_3B, 81, 480, 832, converted_layers=[0], mmdim_config_fn={"chunk_size": 512})
    assert big["layers"][0]["mmdim_parts"]["ssd_intra_x"] > lay0["mmdim_parts"]["ssd_intra_x"]


def test_wan_1_3b_crosscheck_full_size_on_meta():
    cc = crosscheck_wan(WAN_1_3B, 81, 480, 832, 512, converted_layers=[3], mmdim_config=None)
    rows = {r["component"]: r for r in cc["components"]}
    assert cc["ok"], cc["unexplained"]
    assert rows["original_total"]["rel_diff"] == 0.0
    assert rows["self_attention.scores"]["measured"] == 30 * 4 * 32760 ** 2 * 1536
    for lay in cc["layers"]:
        assert lay["attention_scores_measured"] == lay["attention_scores_analytic"] == 4 * 32760 ** 2 * 1536
    assert rows["standalone.mmdim.matmul_total"]["rel_diff"] == 0.0
    if cc["converted_model"] == "checked":
        assert rows["converted_total"]["rel_diff"] == 0.0
        assert rows["converted.blocks.3.mmdim.matmul_total"]["rel_diff"] == 0.0
        assert cc["layers"][3]["mmdim_measured"] == cc["layers"][3]["mmdim_analytic"]
    else:  # the converted Wan class is optional here; the reason must be recorded
        assert cc["converted_model"].startswith("skipped: ")


def test_tiny_wan_crosscheck_every_component():
    cc = crosscheck_wan(TINY_WAN, 9, 64, 48, text_len=7, converted_layers=[0, 2], mmdim_config=TINY_MMDIM)
    assert cc["ok"], cc["unexplained"]
    for r in cc["components"]:
        if not r["flagged"]:
            assert r["rel_diff"] == 0.0, r
        else:
            assert r["component"].rsplit(".", 1)[-1] in ("conv1d", "ssd_state_passing"), r


def test_tiny_wan_i2v_crosscheck():
    i2v = {**TINY_WAN, "image_dim": 20, "added_kv_proj_dim": 32, "text_dim": 24}
    # diffusers' I2V attention hard-codes 512 text tokens
    cc = crosscheck_wan(i2v, 5, 32, 32, text_len=512, converted_layers=[], mmdim_config=TINY_MMDIM)
    assert cc["ok"], cc["unexplained"]
    rows = {r["component"]: r for r in cc["components"]}
    for name in ("condition_embedder", "cross_attention", "original_total"):
        assert rows[name]["rel_diff"] == 0.0, rows[name]


# ----------------------------------------------------------------------------- curve and report

def test_crossover_is_where_the_curves_cross():
    curve = flops_vs_frames(WAN_1_3B, 480, 832, converted_layers="all", max_frames=81)
    x = curve["crossover_frames"]
    assert x is not None and x > 1
    i = curve["frames"].index(x)
    assert curve["converted"][i] < curve["original"][i]
    assert all(c >= o for c, o in zip(curve["converted"][:i], curve["original"][:i]))
    before = wan_model_flops(WAN_1_3B, x - 1, 480, 832, converted_layers="all")
    at = wan_model_flops(WAN_1_3B, x, 480, 832, converted_layers="all")
    assert before["converted_total_flops"] >= before["original_total_flops"]
    assert at["converted_total_flops"] < at["original_total_flops"]
    assert at["converted_total_flops"] == curve["converted"][i]
    # never within the range -> None
    assert flops_vs_frames(WAN_1_3B, 480, 832, frames=[1], converted_layers="all")["crossover_frames"] is None


def test_report_files(tmp_path):
    report = build_wan_flops_report(TINY_WAN, 17, 64, 48, text_len=7, converted_layers=[1],
                                    mmdim_config=TINY_MMDIM, name="tiny-wan")
    paths = write_flops_report(report, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    for key in ("original_total_flops", "converted_total_flops", "layers", "video", "tokens", "crossover_frames",
                "crosscheck"):
        assert key in data
    assert data["video"] == {"frames": 17, "height": 64, "width": 48}
    assert data["tokens"] == 5 * 4 * 3
    for lay in data["layers"]:
        assert isinstance(lay["index"], int)
        assert isinstance(lay["attention_flops"], (int, float)) and isinstance(lay["mmdim_flops"], (int, float))
    assert data["crosscheck"]["ok"] and data["crosscheck"]["components"]
    md = paths["md"].read_text()
    assert "TFLOPs" in md and "speed-up" in md and "Crossover" in md
    orig, conv = data["original_total_flops"], data["converted_total_flops"]
    assert f"| original | {format_tflops(orig)} |" in md and f"| converted | {format_tflops(conv)} |" in md
    assert f"{orig / conv:.2f}×" in md
    assert format_tflops(283.0e12) == "283.000" and format_tflops(1.5e9) == "0.0015"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="missing keys"):
        write_flops_report({"layers": []}, tmp_path / "bad")


def test_crosscheck_mmdim_standalone_meta():
    cfg = MMDiMConfig(d_model=32, nheads=4, headdim=8, chunk_size=16, temporal_dim=8)
    res = crosscheck_mmdim(cfg, VideoLayout.single(3, 4, 6), text_len=9)
    flagged = {r["component"] for r in res["rows"] if r["flagged"]}
    assert flagged == {"mmdim.conv1d", "mmdim.ssd_state_passing"}
