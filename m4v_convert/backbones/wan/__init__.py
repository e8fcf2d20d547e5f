"""Wan2.1 (and Wan2.1-layout models): loading every checkpoint layout (``load``), the converted
model (``model``), its distillation adapter (``distill``), its FLOPs model (``flops``) and tiny
models in the real on-disk formats for tests (``testing``). Registered as backbone ``wan``."""
