"""Write the small Wan2.1-layout checkpoint the README's run command converts.

It is UNTRAINED: seeded random weights in the real diffusers layout (config.json +
diffusion_pytorch_model.safetensors, same key names as Wan2.1), so the default run exercises the
real load → swap → distill → save path without downloading anything. Re-running this script
reproduces it bit for bit.

    python scripts/make_default_checkpoint.py checkpoints/wan2.1-tiny-untrained
"""

import sys
from pathlib import Path

from m4v_convert.backbones.wan.testing import make_tiny_wan, save_tiny_wan

CONFIG = dict(num_layers=4, num_attention_heads=4, attention_head_dim=32, ffn_dim=256, text_dim=64, freq_dim=64,
              in_channels=16, out_channels=16, rope_max_seq_len=256)
SEED = 20261128

CARD = """# wan2.1-tiny-untrained

A Wan2.1-layout checkpoint (diffusers `WanTransformer3DModel`: {layers} layers, {heads} heads × {hd},
ffn {ffn}, text_dim {text_dim}, {in_ch} latent channels) with **seeded random weights: it is
untrained** and generates noise. It exists so that `m4v-convert wan2.1` runs out of the box on a
machine with no model download, through exactly the code path a real 1.3B/14B checkpoint takes.

Made by `python scripts/make_default_checkpoint.py {folder}` (seed {seed}); weights from
`m4v_convert.backbones.wan.testing.make_tiny_wan` (normal noise scaled by fan-in, norms 1 + noise).
"""


def main(folder: str) -> None:
    out = Path(folder)
    model = make_tiny_wan(seed=SEED, **CONFIG)
    save_tiny_wan(model, out, layout="diffusers")
    (out / "README.md").write_text(CARD.format(
        layers=CONFIG["num_layers"], heads=CONFIG["num_attention_heads"], hd=CONFIG["attention_head_dim"],
        ffn=CONFIG["ffn_dim"], text_dim=CONFIG["text_dim"], in_ch=CONFIG["in_channels"], folder=folder, seed=SEED))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "checkpoints/wan2.1-tiny-untrained")
