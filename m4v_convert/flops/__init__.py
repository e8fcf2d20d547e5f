"""FLOPs accounting shared by every backbone (DESIGN §5): analytic counts of attention and MM-DiM,
FlopCounterMode measurements, the report files. A backbone's whole-model count lives in its folder
(``backbones/wan/flops.py``, ``backbones/pyramidflow/flops.py``)."""

from m4v_convert.flops.analytic import attention_flops, mmdim_flops, ssd_chunked_flops
from m4v_convert.flops.measured import crosscheck_mmdim, measure_flop_counts, measure_flops
from m4v_convert.flops.report import write_flops_report

__all__ = [
    "attention_flops", "crosscheck_mmdim", "measure_flop_counts", "measure_flops", "mmdim_flops",
    "ssd_chunked_flops", "write_flops_report",
]
