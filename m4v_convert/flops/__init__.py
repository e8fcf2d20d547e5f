"""FLOPs accounting (DESIGN §5): analytic counts, FlopCounterMode measurements, the report."""

from m4v_convert.flops.analytic import (
    attention_flops, flops_vs_frames, mmdim_flops, ssd_chunked_flops, wan_latent_grid, wan_model_flops,
)
from m4v_convert.flops.measured import crosscheck_mmdim, crosscheck_wan, measure_flop_counts, measure_flops
from m4v_convert.flops.report import build_wan_flops_report, write_flops_report

__all__ = [
    "attention_flops", "build_wan_flops_report", "crosscheck_mmdim", "crosscheck_wan", "flops_vs_frames",
    "measure_flop_counts", "measure_flops", "mmdim_flops", "ssd_chunked_flops", "wan_latent_grid",
    "wan_model_flops", "write_flops_report",
]
