"""m4v-convert: replace the 3D attention of pretrained video DiTs with MM-DiM (Mamba) blocks.

Importing this package never imports mamba-ssm; the CUDA scan is looked up lazily on first use.
"""

__version__ = "0.1.0"

_LAZY = {
    "ssd_scan": ("m4v_convert.ops", "ssd_scan"),
    "MMDiM": ("m4v_convert.layers.mmdim", "MMDiM"),
    "MMDiMConfig": ("m4v_convert.layers.mmdim", "MMDiMConfig"),
    "mambafy_": ("m4v_convert.convert", "mambafy_"),
    "load_converted": ("m4v_convert.io.converted", "load_converted"),
    "load_pipeline": ("m4v_convert.io.pipeline", "load_pipeline"),
    "M4VError": ("m4v_convert.errors", "M4VError"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'm4v_convert' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
