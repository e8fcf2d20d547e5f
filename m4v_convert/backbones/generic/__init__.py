"""Any diffusers video transformer a ``backbone: generic`` recipe describes: the converted class
built on the fly from the recipe (``model``), its distillation adapter (``distill``) and the
conversion job with ``recipes --check`` and its FLOPs count (``pipeline``). Registered as backbone
``generic``."""
