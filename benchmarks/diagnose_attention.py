"""Where a converted Wan layer loses what its attention carries (issue 28): a diagnosis, not a score.

For every self-attention layer and head of a Wan2.1 teacher, on its calibration latents noised as the
conversion noises them (rectified flow, the recipe's shift), it prints

* where each head's attention goes: the share of its probability mass on keys of the query's own
  frame near it (within ``--radius`` tokens in both spatial axes) or far from it, of the next or previous
  frame near the query's position or far from it, and of frames two or more apart;
* what each kind of key contributes to the layer's output, by restricted-attention oracles computed from
  the teacher's own queries, keys and values (softmax renormalized over the allowed keys, then the
  layer's output projection): ``own frame`` (only the query's frame), ``own + near`` (also the other
  frames' keys near the query's position), ``own + pooled`` (also every other frame pooled to a
  ``--grid``×``--grid`` raster, what MM-DiM's temporal branch sees); each as the relative error
  ‖oracle − teacher‖/‖teacher‖ of the layer output, and per head the error when that head alone loses
  its other frames;
* what a linear attention could keep: exp(q·k/√d) replaced by its first- and second-order Taylor
  polynomials (1 + s, 1 + s + s²/2), over every key without decay: the first is what a Mamba2 head
  initialized from the attention (B = K, C = Q) computes at best, the second what a state of d² features
  per head could;
* with ``--student``, the converted layer (teacher-forced on the same inputs, as stage 1 sees them): its
  relative error against the teacher, against the ``own frame`` oracle, and without its temporal branch,
  and its share of what the other frames add to the teacher's output (the projection of student − own
  frame on teacher − own frame: 1 keeps all of it, below 1 damps it).

    python benchmarks/diagnose_attention.py checkpoints/wan2.1-tiny-shapes-trail --student OUT

One thread, a few seconds per batch on the shipped tiny teachers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def token_grid(frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(frame, row, col) of every token in Wan's raster order (frame-major, then rows)."""
    f, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    return f.reshape(-1), y.reshape(-1), x.reshape(-1)


def key_classes(frames: int, height: int, width: int, radius: int) -> dict[str, torch.Tensor]:
    """(L, L) bool masks over (query, key) pairs, one per kind of key; they partition every row."""
    f, y, x = token_grid(frames, height, width)
    df = (f[:, None] - f[None, :]).abs()
    near = ((y[:, None] - y[None, :]).abs() <= radius) & ((x[:, None] - x[None, :]).abs() <= radius)
    return {"own near": (df == 0) & near, "own far": (df == 0) & ~near, "±1 near": (df == 1) & near,
            "±1 far": (df == 1) & ~near, "≥2 apart": df >= 2}


def restricted(q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    """Attention of (b, L, H, D) q/k/v over the allowed (L, L) keys only → (b, L, H, D)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=allowed).transpose(1, 2)


def pooled_other_frames(q, k, v, frames: int, height: int, width: int, grid: int) -> torch.Tensor:
    """Attention over the query's own frame plus every other frame's keys and values average-pooled to a
    ``grid``×``grid`` raster (region means, as the temporal branch pools), softmax over both → (b, L, H, D)."""
    b, n, h, d = q.shape

    def pool(t):  # (b, L, H, D) → (b, F·g², H, D)
        t = t.reshape(b, frames, height, width, h * d).permute(0, 1, 4, 2, 3).reshape(b * frames, h * d, height, width)
        t = F.adaptive_avg_pool2d(t, grid).reshape(b, frames, h * d, grid * grid).permute(0, 1, 3, 2)
        return t.reshape(b, frames * grid * grid, h, d)

    kk, vv = torch.cat([k, pool(k)], 1), torch.cat([v, pool(v)], 1)
    f, _, _ = token_grid(frames, height, width)
    pf = torch.arange(frames).repeat_interleave(grid * grid)
    allowed = torch.cat([f[:, None] == f[None, :], f[:, None] != pf[None, :]], dim=1)
    return restricted(q, kk, vv, allowed)


def taylor(q, k, v, order: int) -> torch.Tensor:
    """Attention with exp(s) replaced by its Taylor polynomial of ``order`` (s = q·k/√d): what a linear
    attention (an SSM without decay) with a feature map of that degree can express → (b, L, H, D)."""
    s = torch.einsum("blhd,bmhd->bhlm", q, k) / q.shape[-1] ** 0.5
    w = sum(s ** i / torch.exp(torch.lgamma(torch.tensor(i + 1.0))) for i in range(order + 1))
    w = w / w.sum(-1, keepdim=True)
    return torch.einsum("bhlm,bmhd->blhd", w, v)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


class AttentionTap:
    """Captures the q/k/v (after norms and RoPE) that diffusers' Wan self-attention hands its kernel."""

    def __init__(self, teacher, layers):
        import diffusers.models.transformers.transformer_wan as tw

        self.tw, self.original = tw, tw.dispatch_attention_fn
        self.current, self.qkv = None, {}
        self.handles = []
        for i in layers:
            attn = teacher.blocks[i].attn1
            self.handles.append(attn.register_forward_pre_hook(lambda m, a, i=i: setattr(self, "current", i)))
            self.handles.append(attn.register_forward_hook(lambda m, a, o: setattr(self, "current", None)))

        def dispatch(query, key, value, *args, **kwargs):
            if self.current is not None:
                self.qkv[self.current] = (query.detach(), key.detach(), value.detach())
            return self.original(query, key, value, *args, **kwargs)

        tw.dispatch_attention_fn = dispatch

    def close(self):
        self.tw.dispatch_attention_fn = self.original
        for h in self.handles:
            h.remove()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teacher", type=Path, help="Wan2.1 checkpoint folder (diffusers or original layout)")
    ap.add_argument("--student", type=Path, help="its converted model (m4v-convert wan2.1 --out)")
    ap.add_argument("--calib", type=Path, help="clean latents + text (default: TEACHER/calib)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--flow-shift", type=float, default=3.0, help="noise levels as the wan2.1 recipe draws them")
    ap.add_argument("--radius", type=int, default=1, help="'near': within this many tokens in both axes")
    ap.add_argument("--grid", type=int, default=2, help="the temporal branch's pooling raster")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))

    from m4v_convert.backbones.wan.load import load_wan_transformer
    from m4v_convert.backbones.wan.model import record_teacher_layers
    from m4v_convert.distill.calibration import CalibSpec, folder_samples, noised_batch

    teacher = load_wan_transformer(args.teacher)
    cfg = teacher.config
    layers = list(range(cfg.num_layers))
    spec = CalibSpec(cfg.in_channels, cfg.text_dim, 0, 0, 0, 0, flow_shift=args.flow_shift)
    samples = folder_samples(args.calib or args.teacher / "calib", spec)[: args.samples]
    student = None
    if args.student is not None:
        from m4v_convert.io.converted import load_converted

        student = load_converted(args.student)
    g = torch.Generator().manual_seed(args.seed)
    _, pf, ph, pw = (1, *cfg.patch_size)
    frames, height, width = (s // p for s, p in zip(samples[0].latents.shape[1:], (pf, ph, pw)))
    classes = key_classes(frames, height, width, args.radius)
    f, y, x = token_grid(frames, height, width)
    own = f[:, None] == f[None, :]
    # "own + near": the query's frame, and in every other frame the keys near the query's position
    own_near = own | (((y[:, None] - y[None, :]).abs() <= args.radius) & ((x[:, None] - x[None, :]).abs() <= args.radius))

    heads = cfg.num_attention_heads
    mass = {i: torch.zeros(heads, len(classes)) for i in layers}
    sums = {i: {} for i in layers}
    batches = 0
    with torch.no_grad():
        for start in range(0, len(samples), args.batch):
            batch = noised_batch(samples[start : start + args.batch], spec, g)
            tap = AttentionTap(teacher, layers)
            try:
                records = record_teacher_layers(teacher, batch, layers)
            finally:
                tap.close()
            batches += 1
            for i in layers:
                q, k, v = tap.qkv[i]  # (b, L, H, D)
                attn = teacher.blocks[i].attn1
                out = lambda o: attn.to_out[0](o.flatten(2))  # noqa: E731
                probs = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / q.shape[-1] ** 0.5, -1)
                for c, m in enumerate(classes.values()):
                    mass[i][:, c] += (probs * m).sum(-1).mean((0, 2))
                full = restricted(q, k, v, torch.ones_like(own))
                target = records[i].output
                oracles = {"own frame": restricted(q, k, v, own), "own + near": restricted(q, k, v, own_near),
                           "own + pooled": pooled_other_frames(q, k, v, frames, height, width, args.grid),
                           "linear (exp → 1 + s)": taylor(q, k, v, 1), "exp → 2nd order": taylor(q, k, v, 2)}
                row = {"check: full attention": rel(out(full), target)}
                row.update({name: rel(out(o), target) for name, o in oracles.items()})
                for h in range(heads):
                    one = full.clone()
                    one[:, :, h] = oracles["own frame"][:, :, h]
                    row[f"head {h} own frame"] = rel(out(one), target)
                if student is not None:
                    block = student.blocks[i].attn1.mmdim
                    x, ctx = records[i].hidden_states, records[i].context
                    s, _ = block(x, **ctx)
                    row["student"] = rel(s, target)
                    own_frame = out(oracles["own frame"])
                    row["student vs own frame"] = rel(s, own_frame)
                    # how much of what the other frames add to the teacher's output the student adds (1: all
                    # of it; below 1: it damps it): the projection of (student − own frame) on (teacher − own frame)
                    cross = target - own_frame
                    row["student's share of the other frames' part"] = float(((s - own_frame) * cross).sum()
                                                                            / cross.pow(2).sum())
                    if block.config.temporal:
                        row["student without temporal branch"] = rel(s - block.temporal(x, ctx["layout"]), target)
                for name, value in row.items():
                    sums[i][name] = sums[i].get(name, 0.0) + value

    print(f"teacher {args.teacher}  ({len(samples)} calibration samples, flow shift {args.flow_shift:g}, "
          f"{frames}×{height}×{width} tokens, 'near' = within {args.radius})")
    print("\nattention mass by key (mean over queries), per layer and head")
    print("| layer | head | " + " | ".join(classes) + " |")
    print("|---|---|" + "---|" * len(classes))
    for i in layers:
        for h in range(heads):
            cells = " | ".join(f"{float(m) / batches:.3f}" for m in mass[i][h])
            print(f"| {i} | {h} | {cells} |")
    names = list(sums[layers[0]])
    print("\nrelative error of the layer output vs the teacher's (mean over batches)")
    print("| layer | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for i in layers:
        print(f"| {i} | " + " | ".join(f"{sums[i][n] / batches:.3f}" for n in names) + " |")


if __name__ == "__main__":
    main()
