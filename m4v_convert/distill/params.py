"""Which student parameters a stage trains (``--train mmdim|all|lora``), and LoRA through peft.

* ``mmdim``: only the new MM-DiM blocks (default; stage 1 always trains exactly these);
* ``all``: every student parameter;
* ``lora``: the MM-DiM blocks plus LoRA adapters on the backbone's untouched linear layers (for
  Wan: cross-attention ``attn2`` and ``ffn``); the adapters are merged into those layers before
  the model is saved, so the output is a plain converted model.
"""

from __future__ import annotations

import torch.nn as nn

from m4v_convert.errors import M4VError

TRAIN_MODES = ("mmdim", "all", "lora")


def check_train_mode(mode: str) -> str:
    if mode not in TRAIN_MODES:
        raise M4VError(f"--train: expected one of {', '.join(TRAIN_MODES)}, got {mode!r}")
    return mode


def _peft():
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer
    except ImportError as e:
        raise M4VError(f"--train lora needs the 'peft' package, which cannot be imported here ({e}); "
                       "install it (pip install peft) or use --train mmdim|all") from None
    return LoraConfig, inject_adapter_in_model, LoraLayer


def add_lora(model: nn.Module, target_modules: str, rank: int, alpha: float) -> list[str]:
    """Inject LoRA adapters (peft) into the linear layers whose qualified name matches the regex
    ``target_modules``; returns the adapted module names. B starts at zero: the output is unchanged."""
    LoraConfig, inject_adapter_in_model, LoraLayer = _peft()
    if rank < 1:
        raise M4VError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0, bias="none")
    try:
        inject_adapter_in_model(config, model)
    except ValueError as e:
        raise M4VError(f"--train lora: no layer to adapt ({e})") from None
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def merge_lora_(model: nn.Module) -> int:
    """Merge every LoRA adapter into its base layer and put the base layer back; returns how many."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in targets:
        base = module.get_base_layer()
        # into a new tensor: the base weight is the teacher's too (from_teacher shares it)
        base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return len(targets)


def trainable_params(model: nn.Module, mode: str, mmdim_blocks: dict[int, nn.Module]) -> dict[str, nn.Parameter]:
    """Name → parameter trained in ``mode`` (names as in ``model.named_parameters()``)."""
    ids = {id(p) for blk in mmdim_blocks.values() for p in blk.parameters()}
    out = {}
    for name, p in model.named_parameters():
        if mode == "all":
            keep = True
        elif mode == "lora":
            keep = id(p) in ids or ".lora_" in name
        else:
            keep = id(p) in ids
        if keep:
            out[name] = p
    return out


def own_parameters_(model: nn.Module, params: dict[str, nn.Parameter], others: nn.Module) -> dict[str, nn.Parameter]:
    """``params`` with every one that ``others`` (the teacher) holds too replaced in ``model`` by a copy
    of its own, so training ``model`` never changes ``others``; returns the name → parameter map
    after the copies (the student shares its untouched weights with the teacher: ``from_teacher``)."""
    held = {id(p) for p in others.parameters()}
    out = {}
    for name, p in params.items():
        if id(p) in held:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            p = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            setattr(module, leaf, p)
        out[name] = p
    return out


def set_trainable(model: nn.Module, params: dict[str, nn.Parameter]) -> None:
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
