"""Pictures of latent videos side by side (teacher | student): an animated GIF and a PNG grid of
frames, drawn through a task's ``to_rgb`` (the synthetic task's latent → colour map)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from m4v_convert.synthetic import ShapesTask


def _tiles(task: ShapesTask, xs: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, C, F, H, W) → (B, F, H·scale, W·scale, 3) uint8."""
    rgb = task.to_rgb(xs)  # (B, F, H, W, 3)
    rgb = rgb.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    return (rgb * 255).round().to(torch.uint8)


def write_gif(task: ShapesTask, teacher_xs, student_xs, labels: list[str], path: Path, rows: int = 8,
              scale: int = 6, ms: int = 300) -> None:
    """Animated GIF: one row per sample, ``teacher | student`` side by side, one GIF frame per latent frame."""
    from PIL import Image, ImageDraw

    n = min(rows, teacher_xs.shape[0])
    ta, st = _tiles(task, teacher_xs[:n], scale), _tiles(task, student_xs[:n], scale)
    _, f, th, tw, _ = ta.shape
    gap, label_w, header = 4, 150, 16
    width = label_w + 2 * tw + 3 * gap
    height = header + n * (th + gap) + gap
    frames = []
    for fi in range(f):
        im = Image.new("RGB", (width, height), (255, 255, 255))
        d = ImageDraw.Draw(im)
        d.text((label_w + gap, 2), "teacher", fill=(0, 0, 0))
        d.text((label_w + 2 * gap + tw, 2), "student", fill=(0, 0, 0))
        d.text((width - 52, 2), f"frame {fi}", fill=(90, 90, 90))
        for r in range(n):
            y = header + r * (th + gap)
            d.text((4, y + th // 2 - 6), labels[r], fill=(0, 0, 0))
            im.paste(Image.fromarray(ta[r, fi].numpy()), (label_w + gap, y))
            im.paste(Image.fromarray(st[r, fi].numpy()), (label_w + 2 * gap + tw, y))
        frames.append(im.convert("P", palette=Image.ADAPTIVE, colors=64))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms, loop=0, optimize=True)


def write_frame_grid(task: ShapesTask, teacher_xs, student_xs, labels: list[str], path: Path, rows: int = 4) -> None:
    """PNG: for each of ``rows`` samples, a teacher row and a student row, one column per latent frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(rows, teacher_xs.shape[0])
    ta, st = task.to_rgb(teacher_xs[:n]), task.to_rgb(student_xs[:n])
    f = ta.shape[1]
    fig, axes = plt.subplots(2 * n, f, figsize=(1.3 * f + 1.2, 1.35 * 2 * n), squeeze=False)
    for r in range(n):
        for which, src in ((0, ta), (1, st)):
            for fi in range(f):
                ax = axes[2 * r + which, fi]
                ax.imshow(src[r, fi].numpy(), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if fi == 0:
                    ax.set_ylabel(("teacher\n" if which == 0 else "student\n") + labels[r].replace("a ", "", 1)
                                  .replace(" moving", "\n"), fontsize=6)
                if r == 0 and which == 0:
                    ax.set_title(f"frame {fi}", fontsize=8)
    fig.suptitle("latents → RGB (fixed projection: each colour vector → its named colour)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
