"""Tiny Wan2.1 models and their on-disk formats, for tests (CPU, milliseconds).

    model = make_tiny_wan(seed=0)
    path = save_tiny_wan(model, tmp_path / "ckpt", layout="original")
    out = model(**tiny_wan_inputs(model)).sample
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TINY_WAN_CONFIG",
    "LAYOUTS",
    "tiny_wan_config",
    "make_tiny_wan",
    "save_tiny_wan",
    "make_tiny_wan_pipeline",
    "tiny_wan_inputs",
    "original_wan_state_dict",
]

#: 2 layers, 2 heads x 16 (dim 32), ffn 64, text_dim 32, freq_dim 16, 4 latent channels.
TINY_WAN_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 32,
    "freq_dim": 16,
    "ffn_dim": 64,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 64,
}

#: On-disk layouts :func:`save_tiny_wan` writes.
LAYOUTS = (
    "diffusers",  # config.json + diffusion_pytorch_model.safetensors
    "diffusers-sharded",  # config.json + index + >= 2 shards (save_pretrained(max_shard_size=...))
    "pipeline",  # model_index.json + transformer/
    "original",  # original Wan config.json + diffusion_pytorch_model.safetensors with original names
    "original-sharded",  # the same, sharded like the 14B release (index + >= 2 shards)
    "original-file",  # one bare .safetensors file with original names, no config
)


def tiny_wan_config(**overrides: Any) -> dict[str, Any]:
    """WanTransformer3DModel kwargs of a tiny model; ``overrides`` replace entries."""
    cfg = dict(TINY_WAN_CONFIG)
    cfg.update(overrides)
    return cfg


@torch.no_grad()
def make_tiny_wan(seed: int = 0, **overrides: Any):
    """A tiny ``WanTransformer3DModel`` (fp32, eval) whose every parameter is seeded random.

    Norm weights are 1 + noise, biases and everything else are non-zero noise, so a swapped,
    dropped or transposed tensor changes the output.
    """
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**tiny_wan_config(**overrides))
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name and leaf == "weight":
            value = 1.0 + 0.1 * noise
        elif p.ndim >= 2 and leaf == "weight":
            value = noise / math.sqrt(p[0].numel())
        elif leaf == "scale_shift_table":
            value = noise / math.sqrt(p.shape[-1])
        else:
            value = 0.1 * noise
        p.copy_(value.to(p.dtype))
    return model.eval()


def tiny_wan_inputs(
    model, batch: int = 1, frames: int = 3, height: int = 8, width: int = 8, text_len: int = 5, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Forward kwargs: ``hidden_states`` (b, C, F, H, W), ``timestep`` (b,), ``encoder_hidden_states``
    (b, text_len, text_dim), on the model's device, fp32."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    hidden = torch.randn(batch, cfg.in_channels, frames, height, width, generator=gen)
    timestep = torch.rand(batch, generator=gen) * 1000.0
    text = torch.randn(batch, text_len, cfg.text_dim, generator=gen)
    return {
        "hidden_states": hidden.to(device),
        "timestep": timestep.to(device),
        "encoder_hidden_states": text.to(device),
    }


def original_wan_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under the original Wan names (see ``load.wan_key_to_original``)."""
    from m4v_convert.backbones.wan.load import wan_key_to_original

    return {wan_key_to_original(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _original_config(model) -> dict[str, Any]:
    c = model.config
    return {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "model_type": "t2v",
        "patch_size": list(c.patch_size),
        "text_len": 512,
        "in_dim": c.in_channels,
        "dim": c.num_attention_heads * c.attention_head_dim,
        "ffn_dim": c.ffn_dim,
        "freq_dim": c.freq_dim,
        "text_dim": c.text_dim,
        "out_dim": c.out_channels,
        "num_heads": c.num_attention_heads,
        "num_layers": c.num_layers,
        "eps": c.eps,
    }


def _save_shards(state: dict[str, torch.Tensor], folder: Path, n_shards: int = 2) -> None:
    from safetensors.torch import save_file

    keys = list(state)
    per = math.ceil(len(keys) / n_shards)
    groups = [keys[i : i + per] for i in range(0, len(keys), per)]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k] for k in group}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))


#: the words of the tiny pipeline's tokenizer (a word-level vocabulary built here: nothing is downloaded)
TINY_WORDS = ("<pad>", "</s>", "<unk>", *"a the red blue green ball cube rolls moves left right up down on table".split())


def make_tiny_wan_pipeline(seed: int = 0):
    """A tiny diffusers ``WanPipeline`` in the real formats: a word-level tokenizer (saved as Wan's
    tokenizer/ folder), a 1-layer ``UMT5EncoderModel``, a tiny ``AutoencoderKLWan`` (16 latent
    channels, diffusers' own test sizes), ``FlowMatchEulerDiscreteScheduler`` and a tiny transformer
    (:func:`make_tiny_wan` with 16 channels). ``pipe.save_pretrained(folder)`` writes the pipeline
    folder a user downloads (``model_index.json``, ``transformer/``, ``text_encoder/``, ...)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(TINY_WORDS), d_model=TINY_WAN_CONFIG["text_dim"], d_kv=8,
                                               d_ff=32, num_layers=1, num_heads=4,
                                               relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    transformer = make_tiny_wan(seed=seed, in_channels=16, out_channels=16)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def save_tiny_wan(model, folder: str | os.PathLike, layout: str = "diffusers", key_prefix: str = "") -> Path:
    """Write ``model`` in one of :data:`LAYOUTS` under ``folder``; return the path to load from.

    ``key_prefix`` (original layouts only), e.g. ``"model.diffusion_model."`` as ComfyUI writes.
    """
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        model.save_pretrained(folder)
        return folder
    if layout == "diffusers-sharded":
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        model.save_pretrained(folder, max_shard_size=total // 3)
        return folder
    if layout == "pipeline":
        import diffusers

        index = {
            "_class_name": "WanPipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": [None, None],
            "text_encoder": [None, None],
            "tokenizer": [None, None],
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "vae": [None, None],
        }
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
        model.save_pretrained(folder / "transformer")
        return folder

    state = {key_prefix + k: v for k, v in original_wan_state_dict(model).items()}
    if layout == "original-file":
        path = folder / "wan2.1_tiny_original.safetensors"
        save_file(state, str(path), metadata={"format": "pt"})
        return path
    (folder / "config.json").write_text(json.dumps(_original_config(model), indent=2))
    if layout == "original":
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    else:  # original-sharded
        _save_shards(state, folder, n_shards=3)
    return folder


def save_tiny_wan_recipe(path: str | os.PathLike) -> Path:
    """The shipped wan2.1 recipe for the tiny models above, written to ``path``: its published configs by
    absolute path, a small temporal branch, synthetic calibration latents of 2 × 8 × 8 in batches of 2."""
    import yaml

    from m4v_convert.recipes import RECIPES_DIR

    data = yaml.safe_load((RECIPES_DIR / "wan2.1.yaml").read_text())
    data["published"] = {k: str(RECIPES_DIR / v) for k, v in data["published"].items()}
    data["mmdim"].update(temporal_dim=8, temporal_heads=2)
    data["calib"].update(latent_frames=2, latent_height=8, latent_width=8, text_len=6, num_samples=6, batch_size=2)
    path = Path(path)
    path.write_text(yaml.safe_dump(data))
    return path
