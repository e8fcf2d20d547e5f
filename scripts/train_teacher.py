"""Train the small Wan2.1-layout teachers shipped in ``checkpoints/wan2.1-tiny-shapes*``.

A diffusers ``WanTransformer3DModel`` (real Wan2.1 layout, small sizes) learns the synthetic
text-to-video task of :mod:`m4v_convert.synthetic` (coloured squares/discs moving left/right/up/
down, generated on the fly directly as latents) with the rectified-flow objective of Wan:
``x_t = (1 − σ)·x_0 + σ·ε``, ``timestep = 1000·σ``, loss ``MSE(model(x_t, t, text), ε − x_0)``,
σ uniform in (0, 1) (or logit-normal, ``--sigma``) then shifted with ``--train-shift`` (3, the same
shift as the sampler, which spends most of its steps near σ = 1: a teacher trained on logit-normal
σ, which almost never draws σ > 0.95, predicts well at σ ≤ 0.9 yet samples garbage). AdamW, linear warm-up then cosine decay;
the saved weights are an exponential moving average (EMA) of the trained ones.

Everything is seeded (``--seed``: model init, data and noise; the task's colour vectors and word
table come from ``TaskConfig.seed``); with the same torch build and thread count a re-run
reproduces the checkpoint bit for bit. Single-threaded by default so it shares a small machine.

    nice -n 10 python scripts/train_teacher.py --out checkpoints/wan2.1-tiny-shapes-coded \
        --task frame_code=2 --task position_code=2 --threads 1 --max-minutes 30   # the default teacher
    nice -n 10 python scripts/train_teacher.py --out checkpoints/wan2.1-tiny-shapes       # the plain task

Writes into ``--out``: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (the teacher,
diffusers layout), ``task.json`` (the synthetic task), ``calib/shapes-calib.safetensors``
(clean training-distribution latents + text embeddings for ``m4v-convert wan2.1 --calib``),
``training.json`` (settings, loss curve, timings, sample quality) and ``README.md``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from m4v_convert.synthetic import ShapesTask, TaskConfig, euler_sample, heldout_labels, shift_sigma, train_labels

MODEL = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
             text_dim=64, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("checkpoints/wan2.1-tiny-shapes"))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--sigma", choices=("logit-normal", "uniform"), default="uniform",
                   help="training σ distribution: uniform (Wan) or logit-normal(0, 1) (SD3), then shifted")
    p.add_argument("--frame-sigma-prob", type=float, default=0.0,
                   help="probability that a training sample draws its own σ for every frame (diffusion forcing: "
                        "a noisier frame must be predicted from cleaner ones, which rewards tracking over time); "
                        "sampling always uses one σ")
    p.add_argument("--clean-frame-prob", type=float, default=0.0,
                   help="probability that a training sample shows one random frame clean (σ = 0, left out of the "
                        "loss): the other frames must then be placed relative to it, at signed offsets in time")
    p.add_argument("--shift-init", type=float, default=0.0, metavar="A",
                   help="start heads 0 and 1 of every self-attention as previous-frame / next-frame heads: q/k "
                        "biases of size A on the first temporal and spatial RoPE pairs, the key's temporal pair "
                        "turned by ±1 rad (0: plain init)")
    p.add_argument("--train-shift", type=float, default=3.0,
                   help="σ shift in training (= the sampler's: the sampler spends most steps near σ = 1)")
    p.add_argument("--probe-every", type=int, default=500, help="quick held-out adherence probe of the EMA")
    p.add_argument("--sample-shift", type=float, default=3.0)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--eval-seeds", type=int, default=4, help="seeds per held-out prompt for the quality check")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-dtype", choices=("float32", "float16"), default="float32",
                   help="storage dtype of calib/ (read back as float32)")
    p.add_argument("--calib-only", action="store_true",
                   help="rewrite --out/calib/ (and the card) from its task.json and training.json, without training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=MODEL["num_layers"])
    p.add_argument("--heads", type=int, default=MODEL["num_attention_heads"])
    p.add_argument("--head-dim", type=int, default=MODEL["attention_head_dim"],
                   help="attention head width (Wan's 3D RoPE splits it into time/height/width frequencies)")
    p.add_argument("--task", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a TaskConfig field, e.g. --task speed=1 (repeatable)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--card-only", action="store_true", help="rewrite --out/README.md from its training.json")
    p.add_argument("--max-minutes", type=float, default=30.0, help="stop training early past this wall time")
    p.add_argument("--stop-step", type=int, default=0,
                   help="stop after this many steps of the --steps schedule (0: run it all); a run that "
                        "--max-minutes cut short is reproduced exactly with --stop-step at the step it reached")
    return p.parse_args(argv)


def sample_quality(model, task: ShapesTask, labels, seeds_per_prompt: int, steps: int, shift: float) -> dict:
    labs = [lab for lab in labels for _ in range(seeds_per_prompt)]
    seeds = [i for _ in labels for i in range(seeds_per_prompt)]
    _, text = task.eval_batch(labs, seeds)
    c = task.config
    noise = torch.stack([torch.randn(c.channels, c.frames, c.height, c.width,
                                     generator=torch.Generator().manual_seed(2_000_000 + i)) for i in range(len(labs))])
    out = euler_sample(model, noise, text, steps=steps, shift=shift, batch_size=16)
    res = task.adherence(out, labs)
    res.pop("read")
    return res


@torch.no_grad()
def temporal_shift_init(model, size: float) -> None:
    """Make heads 0 and 1 of every self-attention attend to the same place one frame back / ahead.

    Wan rotates each (2i, 2i+1) pair of a head by its frequency × position, so a pair's score is
    |q||k|·cos(θ·(p_q − p_k) − φ) with φ the key's angle against the query's: constant q/k biases on
    the first temporal pair (θ = 1 rad per frame) with φ = ±1 peak at the previous / next frame, and
    equal biases on the first h and w pairs peak at the same patch. Content terms add to them, so
    training can reshape these heads like any other."""
    rope = model.rope
    t0, h0, w0 = 0, rope.t_dim, rope.t_dim + rope.h_dim  # first pair of each axis within a head
    head_dim = rope.t_dim + rope.h_dim + rope.w_dim
    for block in model.blocks:
        attn = block.attn1
        for head, phi in ((0, 1.0), (1, -1.0)):
            base = head * head_dim
            for bias in (attn.to_q.bias, attn.to_k.bias):
                for d in (h0, w0):
                    bias[base + d], bias[base + d + 1] = size, 0.0
            attn.to_q.bias[base + t0], attn.to_q.bias[base + t0 + 1] = size, 0.0
            attn.to_k.bias[base + t0] = size * math.cos(phi)
            attn.to_k.bias[base + t0 + 1] = size * math.sin(phi)


def clean_frames(batch: int, frames: int, prob: float, gen: torch.Generator) -> torch.Tensor:
    """(batch, frames) bool: with probability ``prob`` a sample shows one random frame clean."""
    shown = torch.rand(batch, generator=gen) < prob
    which = torch.randint(frames, (batch,), generator=gen)
    return shown[:, None] & (torch.arange(frames)[None] == which[:, None])


def flow_loss(pred: torch.Tensor, target: torch.Tensor, clean: torch.Tensor | None = None) -> torch.Tensor:
    """MSE over (B, C, F, H, W), leaving out the frames ``clean`` marks: shown at σ = 0 their target
    ε − x₀ holds noise the input does not, so they would only add irreducible loss."""
    err = (pred - target).pow(2)
    if clean is None:
        return err.mean()
    keep = (~clean).to(err.dtype)[:, None, :, None, None].expand_as(err)
    return (err * keep).sum() / keep.sum()


INFLUENCE_SAMPLES = 4  # pure-noise inputs the temporal-influence probe averages over


def frame_rms_ratio(diff: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """Per frame of (B, C, F, H, W) ``diff``: its RMS over the RMS of ``ref`` (each sample's own,
    over all of ``ref``), mean over the batch, rounded: the probes' common measure."""
    rel = diff.pow(2).mean((1, 3, 4)).sqrt() / ref.pow(2).mean((1, 2, 3, 4)).sqrt()[:, None]
    return [round(v, 4) for v in rel.mean(0).tolist()]


@torch.no_grad()
def temporal_influence(model, task: ShapesTask, timesteps=(900, 500, 100), samples: int = INFLUENCE_SAMPLES) -> dict:
    """How much each frame's prediction moves when only frame 0 of the input is redrawn, relative to
    the prediction's RMS, per timestep (mean over ``samples`` seeded pure-noise inputs and prompts).
    A model that tracks an object from frame to frame is moved more at the next frame than at the
    last; a model that only pools global facts over time is moved the same at every distance."""
    c = task.config
    labels = heldout_labels()[:samples]
    text = task.encode(labels)
    g = torch.Generator().manual_seed(3_000_000)
    x = torch.randn(samples, c.channels, c.frames, c.height, c.width, generator=g)
    x2 = x.clone()
    x2[:, :, 0] = torch.randn(samples, c.channels, c.height, c.width, generator=g)
    out = {}
    for t in timesteps:
        ts = torch.full((samples,), float(t))
        y = model(hidden_states=x, timestep=ts, encoder_hidden_states=text, return_dict=False)[0]
        y2 = model(hidden_states=x2, timestep=ts, encoder_hidden_states=text, return_dict=False)[0]
        out[str(t)] = frame_rms_ratio(y2 - y, y)
    return out


def write_calib(out: Path, task: ShapesTask, n: int, seed: int, dtype: str = "float32") -> None:
    """``out/calib/shapes-calib.safetensors``: ``n`` clean latents of training prompts + text embeddings,
    drawn from their own generator (``seed + 200``), so they do not depend on how training went."""
    from safetensors.torch import save_file

    labels = train_labels()
    calib_gen = torch.Generator().manual_seed(seed + 200)
    idx = torch.randint(len(labels), (n,), generator=calib_gen).tolist()
    lat, txt = task.batch([labels[i] for i in idx], calib_gen)
    (out / "calib").mkdir(exist_ok=True)
    save_file({"latents": lat.to(getattr(torch, dtype)).contiguous(), "text_embeds": txt.contiguous()},
              str(out / "calib" / "shapes-calib.safetensors"),
              metadata={"what": "clean latents of the shapes task (training prompts) + word-table text embeddings"})


@torch.no_grad()
def frame_awareness(model, task: ShapesTask, prompts: int = INFLUENCE_SAMPLES, data_samples: int = 64) -> dict:
    """Does the model know which frame is which? At σ = 1 the input holds no information, so the ideal
    clean-latent prediction of frame f is the data mean E[x_0 | prompt, frame f], whatever the noise.
    The model gets pure noise that is *the same in every frame* (only the frame index tells frames
    apart, through RoPE's relative offsets and the sequence ends) and predicts x̂_0 = x − v. Per
    frame: ``model`` = RMS(x̂_0,f − x̂_0,mid) / RMS(x̂_0,mid), ``data`` = the same of the data means
    (``data_samples`` training-distribution videos per prompt); mean over ``prompts`` held-out prompts.
    A model that places the object frame by frame reaches ``data``; a frame-blind one stays near 0.
    ``model_mirror`` / ``data_mirror``: the same distance between frame f and frame F − 1 − f (its
    mirror in time). RoPE's relative offsets and the two sequence ends can tell a model how far a
    frame is from the middle; telling frame 0 from the last one, which ordering the track needs,
    takes a score that is not symmetric in the offset."""
    c = task.config
    labels = heldout_labels()[:prompts]
    mid = c.frames // 2
    g = torch.Generator().manual_seed(3_000_001)
    frame = torch.randn(prompts, c.channels, 1, c.height, c.width, generator=g)
    x = frame.repeat(1, 1, c.frames, 1, 1)
    v = model(hidden_states=x, timestep=torch.full((prompts,), 1000.0), encoder_hidden_states=task.encode(labels),
              return_dict=False)[0].float()
    x0 = x - v
    gd = torch.Generator().manual_seed(3_000_002)
    means = torch.stack([task.batch([lab] * data_samples, gd)[0].mean(0) for lab in labels])  # (P, C, F, H, W)

    def spread(y, other):  # per frame: RMS(y − other) / RMS(y's middle frame)
        return frame_rms_ratio(y - other, y[:, :, mid:mid + 1])

    return {"model": spread(x0, x0[:, :, mid:mid + 1]), "data": spread(means, means[:, :, mid:mid + 1]),
            "model_mirror": spread(x0, x0.flip(2)), "data_mirror": spread(means, means.flip(2))}


REVERSAL_SIGMAS = (0.9, 0.7, 0.5)
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@torch.no_grad()
def time_reversal(model, task: ShapesTask, sigmas=REVERSAL_SIGMAS, samples: int = 32) -> dict:
    """Does the model know which way time runs, and does it read the prompt's direction? Its
    denoising loss (the training MSE) on training-distribution clips (``forward``), on the same
    clips and noise played backwards with the prompt kept (``reversed``), and on the clips as they
    are under the prompt with the opposite direction (``opposite_prompt``), at each σ. Both
    mismatches move the object against the prompt, so a model that ties the prompt's direction to
    the order of frames predicts them worse; one whose prediction is the same function of a clip
    played either way (time-reversal equivariant) scores ``reversed`` = ``forward``. A clip played
    backwards is a clip of the opposite direction, so a model that ignores the direction word sees
    time-symmetric data, and that symmetric optimum is what it can learn. ``*_excess_pct``:
    100·(mismatch / forward − 1)."""
    g = torch.Generator().manual_seed(3_000_003)
    labels = train_labels()
    picked = [labels[i] for i in torch.randint(len(labels), (samples,), generator=g).tolist()]
    x0, text = task.batch(picked, g)
    opposite = task.encode([dataclasses.replace(lab, direction=OPPOSITE[lab.direction]) for lab in picked])
    noise = torch.randn(x0.shape, generator=g)
    out = {}
    for sigma in sigmas:
        losses = {}
        for name, clip, eps, txt in (("forward", x0, noise, text), ("reversed", x0.flip(2), noise.flip(2), text),
                                     ("opposite_prompt", x0, noise, opposite)):
            x_t = (1 - sigma) * clip + sigma * eps
            v = model(hidden_states=x_t, timestep=torch.full((samples,), 1000.0 * sigma),
                      encoder_hidden_states=txt, return_dict=False)[0].float()
            losses[name] = round((v - (eps - clip)).pow(2).mean().item(), 5)
        for name in ("reversed", "opposite_prompt"):
            losses[f"{name}_excess_pct"] = round(100 * (losses[name] / losses["forward"] - 1), 2)
        out[str(sigma)] = losses
    return out


OTHER_AXIS = {"left": "up", "right": "down", "up": "left", "down": "right"}


@torch.no_grad()
def word_influence(model, task: ShapesTask, samples: int = 32) -> dict:
    """How much each prompt word moves the prediction where only the text can place the object: at
    σ = 1 (pure noise, the same for every prompt), ``‖v(prompt') − v(prompt)‖ / ‖v(prompt)‖`` with the
    direction swapped for its opposite (``sign``: left ↔ right, up ↔ down), for one on the other axis
    (``axis``: left → up, …) and the colour for the next one (``colour``), in % over training prompts."""
    g = torch.Generator().manual_seed(3_000_004)
    labels = train_labels()
    picked = [labels[i] for i in torch.randint(len(labels), (samples,), generator=g).tolist()]
    c = task.config
    noise = torch.randn(samples, c.channels, c.frames, c.height, c.width, generator=g)
    colours = list(task.colour_names)
    swaps = {"sign": lambda lab: dataclasses.replace(lab, direction=OPPOSITE[lab.direction]),
             "axis": lambda lab: dataclasses.replace(lab, direction=OTHER_AXIS[lab.direction]),
             "colour": lambda lab: dataclasses.replace(lab, colour=colours[(colours.index(lab.colour) + 1) % len(colours)])}
    t = torch.full((samples,), 1000.0)

    def predict(labs):
        return model(hidden_states=noise, timestep=t, encoder_hidden_states=task.encode(labs), return_dict=False)[0].float()

    base = predict(picked)
    return {name: round(100 * ((predict([swap(lab) for lab in picked]) - base).norm() / base.norm()).item(), 3)
            for name, swap in swaps.items()}


PROBES = (("temporal_influence", temporal_influence), ("frame_awareness", frame_awareness),
          ("time_reversal", time_reversal), ("word_influence", word_influence))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.card_only:
        record = json.loads((args.out / "training.json").read_text())
        if any(key not in record for key, _ in PROBES):  # measured on the saved teacher, then kept
            from diffusers import WanTransformer3DModel  # in training.json

            torch.set_num_threads(args.threads)
            model = WanTransformer3DModel.from_pretrained(args.out).eval()
            task = ShapesTask(TaskConfig.load(args.out / "task.json"))
            for key, probe in PROBES:
                if key not in record:
                    record[key] = probe(model, task)
            (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        (args.out / "README.md").write_text(card(record, args.out.name))
        return
    if args.calib_only:
        record = json.loads((args.out / "training.json").read_text())
        task = ShapesTask(TaskConfig.load(args.out / "task.json"))
        write_calib(args.out, task, args.calib_samples, record["seed"], args.calib_dtype)
        command = "python scripts/train_teacher.py " + " ".join(sys.argv[1:] if argv is None else argv)
        record.update(calib_samples=args.calib_samples, calib_dtype=args.calib_dtype, calib_command=command.strip())
        (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        (args.out / "README.md").write_text(card(record, args.out.name))
        print(f"wrote {args.out / 'calib'} ({args.calib_samples} samples, {args.calib_dtype})", flush=True)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from diffusers import WanTransformer3DModel

    overrides = {}
    for item in args.task:
        key, _, value = item.partition("=")
        if not hasattr(TaskConfig(), key):
            raise SystemExit(f"--task {item}: TaskConfig has no field {key!r}")
        default = getattr(TaskConfig(), key)
        if isinstance(default, bool):  # bool("false") is True
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise SystemExit(f"--task {item}: expected true or false")
            overrides[key] = value.lower() in ("1", "true", "yes")
        else:
            overrides[key] = type(default)(value)
    task_cfg = TaskConfig(**{"text_dim": MODEL["text_dim"], "channels": MODEL["in_channels"], **overrides})
    task = ShapesTask(task_cfg)
    cfg = dict(MODEL, num_layers=args.layers, num_attention_heads=args.heads, attention_head_dim=args.head_dim)
    model = WanTransformer3DModel(**cfg).train()
    if args.shift_init:
        temporal_shift_init(model, args.shift_init)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"teacher: {n_params / 1e6:.3f} M params, {cfg['num_layers']} layers, {cfg['num_attention_heads']} heads",
          flush=True)

    labels = train_labels()
    data_gen = torch.Generator().manual_seed(args.seed + 100)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        q = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * q)))

    curve, t0, window = [], time.time(), []
    steps_done, probe_seconds, stopped = 0, 0.0, None
    for step in range(args.steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        idx = torch.randint(len(labels), (args.batch,), generator=data_gen).tolist()
        x0, text = task.batch([labels[i] for i in idx], data_gen)
        # per-frame σ (diffusion forcing) draws (B, F) values; otherwise the draws stay those of one σ
        # per sample, so the shipped teacher's command still reproduces it
        shape = (args.batch, x0.shape[2]) if args.frame_sigma_prob > 0 else (args.batch,)
        if args.sigma == "uniform":
            u = torch.rand(shape, generator=data_gen)
        else:
            u = torch.sigmoid(torch.randn(shape, generator=data_gen))
        if args.frame_sigma_prob > 0:  # some samples draw a σ per frame, the rest keep one
            own = torch.rand(args.batch, 1, generator=data_gen) < args.frame_sigma_prob
            u = torch.where(own, u, u[:, :1])
        else:
            u = u[:, None]
        sigma = shift_sigma(u, args.train_shift)  # (B, 1) or (B, F)
        noise = torch.randn(x0.shape, generator=data_gen)
        clean = None
        if args.clean_frame_prob > 0:  # drawn only then, so runs without it keep their draws
            clean = clean_frames(args.batch, x0.shape[2], args.clean_frame_prob, data_gen)
            sigma = torch.where(clean, torch.zeros(()), sigma.expand_as(clean))
        s = sigma.view(args.batch, 1, -1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        if sigma.shape[1] == 1:
            timestep = sigma[:, 0] * 1000
        else:  # per-token timesteps (Wan 2.2's (batch, seq_len) form), tokens frame-major
            _, ph, pw = cfg["patch_size"]
            timestep = (sigma * 1000).repeat_interleave(x0.shape[3] * x0.shape[4] // (ph * pw), dim=1)
        pred = model(hidden_states=x_t, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
        loss = flow_loss(pred, noise - x0, clean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        window.append(loss.item())
        steps_done = step + 1
        if steps_done % args.log_every == 0 or steps_done == args.steps:
            mean = sum(window) / len(window)
            curve.append({"step": steps_done, "loss": mean, "seconds": round(time.time() - t0, 1)})
            window = []
            print(f"step {steps_done:5d}  loss {mean:.4f}  lr {lr_at(step):.2e}  {time.time() - t0:6.0f} s", flush=True)
        if args.probe_every and steps_done % args.probe_every == 0 and steps_done < args.steps:
            tp = time.time()
            q = sample_quality(ema, task, heldout_labels(), 1, 10, args.sample_shift)
            probe_seconds += time.time() - tp
            if curve:
                curve[-1]["probe_heldout"] = q
            print(f"  probe (EMA, held-out, 1 seed, 10 steps): {q}  ({time.time() - tp:.0f} s)", flush=True)
        if args.stop_step and steps_done >= args.stop_step and steps_done < args.steps:
            stopped = "stop-step"
            break
        if time.time() - t0 - probe_seconds > args.max_minutes * 60 and steps_done < args.steps:
            print(f"stopping at step {steps_done}: past --max-minutes {args.max_minutes}", flush=True)
            stopped = "max-minutes"
            break
    train_seconds = time.time() - t0 - probe_seconds

    # sample quality of the EMA weights: held-out prompts (never trained on) and training prompts
    t1 = time.time()
    held = sample_quality(ema, task, heldout_labels(), args.eval_seeds, args.sample_steps, args.sample_shift)
    seen = sample_quality(ema, task, labels[::5], args.eval_seeds, args.sample_steps, args.sample_shift)
    print(f"held-out adherence {held}  training-prompt adherence {seen}  ({time.time() - t1:.0f} s)", flush=True)
    influence = temporal_influence(ema, task)
    print(f"temporal influence of frame 0 on frames 0..{task_cfg.frames - 1}: {influence}", flush=True)
    awareness = frame_awareness(ema, task)
    print(f"frame awareness (spread of the σ=1 prediction over frames, model vs data): {awareness}", flush=True)
    reversal = time_reversal(ema, task)
    print(f"time reversal (denoising loss: clips as they are / played backwards / opposite prompt): {reversal}", flush=True)
    words = word_influence(ema, task)
    print(f"word influence at σ = 1 (% change of the prediction, direction sign / axis / colour swapped): {words}",
          flush=True)

    # write the checkpoint
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    ema.save_pretrained(out, safe_serialization=True)
    task_cfg.save(out / "task.json")
    write_calib(out, task, args.calib_samples, args.seed, args.calib_dtype)
    command = "python scripts/train_teacher.py " + " ".join(sys.argv[1:] if argv is None else argv)
    record = {
        "command": command.strip(), "seed": args.seed, "steps": steps_done, "schedule_steps": args.steps,
        "stopped": stopped, "batch": args.batch, "lr": args.lr,
        "warmup": args.warmup, "ema": args.ema, "sigma": args.sigma, "frame_sigma_prob": args.frame_sigma_prob, "clean_frame_prob": args.clean_frame_prob, "shift_init": args.shift_init, "train_shift": args.train_shift, "threads": args.threads,
        "train_seconds": round(train_seconds, 1), "probe_seconds": round(probe_seconds, 1), "final_loss": curve[-1]["loss"] if curve else None,
        "params": n_params, "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        "task": task_cfg.to_dict(), "sample_steps": args.sample_steps, "sample_shift": args.sample_shift,
        "quality_heldout": held, "quality_train_prompts": seen, "temporal_influence": influence, "frame_awareness": awareness, "time_reversal": reversal, "word_influence": words, "eval_seeds_per_prompt": args.eval_seeds,
        "torch": torch.__version__, "calib_samples": args.calib_samples, "loss_curve": curve,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "README.md").write_text(card(record, args.out.name))
    print(f"wrote {out}", flush=True)


def threads_text(r: dict) -> str:
    n = r.get("threads", 1)
    return "single thread" if n == 1 else f"{n} threads"


def stop_note(r: dict) -> str:
    if r.get("stopped") != "max-minutes":
        return ""
    return (f"; `--max-minutes` cut it at step {r['steps']}, so the same command with `--stop-step {r['steps']}` "
            "reproduces it (same torch build and thread count)")


def schedule_note(r: dict) -> str:
    total = r.get("schedule_steps", r["steps"])
    return "" if total == r["steps"] else f" over a {total}-step schedule"


def calib_note(r: dict) -> str:
    return f" (written by `{r['calib_command']}`)" if r.get("calib_command") else ""


def influence_table(r: dict) -> str:
    """The card's table of :func:`temporal_influence` (frames as columns, timesteps as rows)."""
    inf = r.get("temporal_influence")
    if not inf:
        return "(temporal influence not measured: run `--card-only` to measure it on the saved teacher)"
    frames = len(next(iter(inf.values())))
    head = "| timestep | " + " | ".join(f"frame {f}" for f in range(frames)) + " |"
    rows = [f"| {t} | " + " | ".join(f"{v:.3f}" for v in vals) + " |" for t, vals in inf.items()]
    return ("Change of the prediction at each frame, relative to its RMS, when frame 0 of the input is redrawn "
            f"(`temporal_influence`, {INFLUENCE_SAMPLES} pure-noise inputs):\n\n" + "\n".join([head, "|---|" + "---:|" * frames] + rows))


def awareness_table(r: dict) -> str:
    """The card's table of :func:`frame_awareness` (frames as columns; the model's row and the data's)."""
    fa = r.get("frame_awareness")
    if not fa:
        return "(frame awareness not measured: run `--card-only` to measure it on the saved teacher)"
    frames = len(fa["model"])
    head = "| | " + " | ".join(f"frame {f}" for f in range(frames)) + " |"
    names = (("model", "teacher x̂₀ = x − v, from the middle frame"), ("data", "data means E[x₀ \\| prompt, frame], from the middle frame"),
             ("model_mirror", "teacher x̂₀, from its mirror frame F − 1 − f"), ("data_mirror", "data means, from the mirror frame"))
    rows = [f"| {name} | " + " | ".join(f"{v:.3f}" for v in fa[key]) + " |" for key, name in names if key in fa]
    return ("Distance of each frame's prediction from the middle frame's and from its mirror frame's (frame 0 ↔ "
            f"frame {frames - 1}), relative to the middle frame's RMS, at σ = 1 with the *same* noise in every "
            f"frame (`frame_awareness`, {INFLUENCE_SAMPLES} held-out prompts; the ideal prediction is the data "
            "mean, whatever the noise):\n\n" + "\n".join([head, "|---|" + "---:|" * frames] + rows))


def reversal_table(r: dict) -> str:
    """The card's table of :func:`time_reversal` (σ as rows)."""
    tr = r.get("time_reversal")
    if not tr:
        return "(time reversal not measured: run `--card-only` to measure it on the saved teacher)"
    rows = [f"| {sigma} | {v['forward']:.4f} | {v['reversed']:.4f} ({v['reversed_excess_pct']:+.2f}%) | "
            f"{v['opposite_prompt']:.4f} ({v['opposite_prompt_excess_pct']:+.2f}%) |" for sigma, v in tr.items()]
    return ("Denoising loss (the training MSE) on 32 training-distribution clips: as they are, played backwards "
            "with the prompt kept, and as they are under the prompt of the opposite direction (`time_reversal`; "
            "both mismatches move the object against the prompt):\n\n"
            + "\n".join(["| σ | clip, its prompt | clip backwards | opposite direction in the prompt |",
                          "|---:|---:|---:|---:|"] + rows))


def word_table(r: dict) -> str:
    """The card's line of :func:`word_influence`."""
    w = r.get("word_influence")
    if not w:
        return "(word influence not measured: run `--card-only` to measure it on the saved teacher)"
    return ("Where only the text can place the object (σ = 1, the same pure noise for every prompt), the change "
            "of the prediction when one prompt word is swapped (`word_influence`, 32 training prompts, % of its "
            "norm):\n\n| direction sign (left ↔ right, up ↔ down) | direction axis (left → up, …) | colour |\n"
            f"|---:|---:|---:|\n| {w['sign']:.2f}% | {w['axis']:.2f}% | {w['colour']:.2f}% |")


def codes_note(r: dict) -> str:
    """What the card says of a teacher that learned the motion with the frame and position codes on:
    what the codes are, that it reads the direction word, and how little its self-attention mixes time
    (all numbers from its own record)."""
    t = r["task"]
    if not (t.get("frame_code") and t.get("position_code")):
        return ""
    swapped = [v["opposite_prompt_excess_pct"] for v in (r.get("time_reversal") or {}).values()]
    words = r.get("word_influence") or {}
    influence = r.get("temporal_influence") or {}
    others = [v for vals in influence.values() for v in vals[1:]]
    reads = (f" It reads the direction word: swapping it for its opposite raises the loss by {min(swapped):+.0f}% to "
             f"{max(swapped):+.0f}% (first table), and at σ = 1 the sign moves the prediction by {words['sign']:.1f}% "
             f"against {words['colour']:.1f}% for the colour word (second table)." if swapped and words else "")
    mixing = (f" Its self-attention mixes time little: redrawing frame 0 moves the other frames' predictions by "
              f"{min(others):.3f}–{max(others):.3f} of their RMS (last table), so each token can place the object "
              "from the codes and the text alone, and a student's fidelity on this teacher tests the text path "
              "and the per-frame layout more than temporal mixing." if others else "")
    return f"""

It is trained with `frame_code={t['frame_code']}` and `position_code={t['position_code']}`
(`synthetic.TaskConfig`): every latent frame carries a constant that says which frame it is, and a
fixed backdrop shading says where each pixel is, both along latent directions orthogonal to the
colours (removed before adherence is read back). They stand in for what tells a real Wan2.1 where a
token is (the causal VAE's distinct first frame, the content of real footage), which RoPE attention
over a constant background cannot see, and they are the two things `{PLAIN_NAME}`'s card found
missing: teachers given only the frame code, or neither, ignore the direction word.{reads}{mixing}"""


def motion_paragraph(r: dict) -> str:
    """What the card says about motion: the shipped teacher's diagnosis (and the tries behind it)
    while its held-out direction accuracy stays below 50%; a plain statement for a retrain that
    learned the motion."""
    h, seen = r["quality_heldout"], r["quality_train_prompts"]
    tables = f"{reversal_table(r)}\n\n{word_table(r)}\n\n{awareness_table(r)}\n\n{influence_table(r)}\n"
    if h["direction_acc"] >= 50:
        return (f"**Motion.** Direction accuracy {h['direction_acc']:.1f}% on held-out prompts (chance 25%): the "
                f"teacher moves the object the way the prompt says.{codes_note(r)}\n\n{tables}")
    tr = r.get("time_reversal") or {}
    backwards = [v["reversed_excess_pct"] for v in tr.values()]
    swapped = [v["opposite_prompt_excess_pct"] for v in tr.values()]
    if backwards and max(backwards) >= 1.0:  # time-asymmetric, yet below 50%: the sign is what is missing
        return f"""**What it learned and what it did not.** It knows which way time runs: a clip played backwards
costs it {min(backwards):+.1f}% to {max(backwards):+.1f}% more loss than the clip itself (first table), and frame 0
is told apart from the last one (second table). Its samples move an object along the prompt's track,
but the direction's *sign* is not read: swapping the prompt's direction for its opposite changes the
loss by {min(swapped):+.2f}% to {max(swapped):+.2f}%, and direction accuracy is {h['direction_acc']:.1f}% on held-out
prompts, {seen['direction_acc']:.1f}% on training prompts, where an object moving along the right axis in a
direction picked by chance would score 50% (the two directions of an axis share one track). Fidelity
measurements against it test whether a student keeps that motion, not a prompt's direction.

{tables}"""
    return f"""**What it learned and what it did not.** Colours are right on every sample, prompts it never saw
included, and objects sit where the prompt's track lies. The motion direction is *not* learned:
direction accuracy is at chance or below; samples show an object-coloured blob over the union of the
track in every frame rather than one object moving. The plainest sign: it reads the direction
word only as far as it places the track (horizontal or vertical), not its sign, and it has no notion
of which way time runs. Swapping "left" for "right" in the prompt, or playing a clip backwards (both
move the object against its prompt), leaves its denoising loss unchanged to a tenth of a percent
(first table below): its prediction is the same function of a clip and of the clip reversed. On this
layout a "left" and a "right" track cover the same pixels in opposite order, so without the sign and
the order nothing tells them apart. Placing one object along
a track needs one of two skills, and the two probes after it show it has neither. (1) Knowing which frame it predicts: with
a fixed trajectory per prompt, frame f's object sits at a place of its own. 3D RoPE gives attention
only relative offsets, so the frame index is visible only through the sequence's ends; given the
same noise in every frame at σ = 1, where the ideal prediction of each frame is the data's mean of
that frame, its predictions differ between frames by a fraction of what the data's means do, and
mirror frames (0 and 4, 1 and 3) hardly at all.
(2) Tracking: attention to a neighbouring frame at a given offset. Redrawing only frame 0 of a
pure-noise input moves the prediction at every other frame by the same amount, whatever its
distance from frame 0: its self-attention pools facts shared by the whole video (background,
colour) over time and depends on no temporal offset.

{reversal_table(r)}

{word_table(r)}

{awareness_table(r)}

{influence_table(r)}

Tries at making a teacher learn the motion, at most 30 minutes each on one thread unless stated,
direction accuracy on the 32 held-out samples (chance 25%). With random start positions
(`--task jitter=16`): object sizes 4–6, speeds 1–2, with and without a moving texture, 800–3000 steps: 16–38%;
size 4, speed 2, 6000 steps (27 min): 31%; the same with 6 layers × 6 heads (2.7 M parameters,
3270 steps): 28%; with a moving object texture 0.5 (5000 steps): 28%; at half the colour contrast
and background spread: 34%; over a static background texture 0.25 (`background_texture`), with and
without the object texture: 34% / 22%; with heads of width 64 and 128 instead of 32 (more RoPE
frequencies per axis, same width): 28% / 34%. In these seven (where it was measured) the
influence probe stays flat over distance, like this teacher's, and the samples checked place an
object independently in each frame: at this size and budget the model does not find the
offset-specific attention that tracking needs. Training half the samples with a σ of their own per
frame (`--frame-sigma-prob 0.5`, diffusion forcing: a noisier frame is predicted from cleaner ones;
with the moving texture, 5000 steps) gives the first offset dependence (at timestep 500 frame 1
moves 18% more than frames 2–4: 0.040 vs 0.034) but not yet the motion: direction 34%; with 90% of
the samples so trained, colour fell (75% on the training-time probe at 3150 steps, stopped). On
this teacher's task (fixed layout), `--frame-sigma-prob 0.5` for 6500 steps (30 min) makes the
model half frame-aware (distance from the middle frame 0.35–0.69 against the data's 0.83–1.17,
this teacher 0.07–0.20) but symmetric in time: its frame 0 and frame 4 predictions differ by 0.04
where the data's differ by 1.39. It learned how far a frame is from the middle of the clip, not on
which side, so it cannot order the track: direction 37.5% held-out / 31% on training prompts; the
same on 2 threads, cut by the 30 minutes at step 6921 of a 10000-step schedule: 34.4% / 37.5%,
middle-frame distance 0.32–0.68, frame 0 vs 4 0.04; with 2 heads of width 64 (more temporal RoPE
frequencies): 21.9%, middle-frame distance 0.10–0.29. Mimicking Wan2.1's causal VAE
(`--task vae_time_stride=4`: latent frame 0 one sharp instant, every later frame the object
blurred over its 4 video frames, so frame 0 can be told apart), 6000 steps: 21.9%, frame awareness
0.04–0.24, frame 0 vs 4 0.13 (data 1.43): the anchor is barely used.

Why they fail, measured with `time_reversal` on the tries that follow: none of them reads the
direction's sign. Swapping "left" for "right" in the prompt changes their loss by −0.1% to +0.6%. A
clip played backwards is a clip of the opposite direction, so to a model that does not read the
sign the data is symmetric in time, and its best prediction is too: a backwards clip costs the
first five −0.2% to +0.3% (the trail tries, below, are the exception). Reading the sign only pays
once the model has features that are not symmetric in time, and such features only pay once it
reads the sign: each skill waits for the other. Tries
aimed at that, 30 minutes each on one thread, direction accuracy held-out / training prompts: on
the jitter task (size 4, speed 2), an image-to-video pretext (`--clean-frame-prob 0.5`: half the
samples show one random frame clean, left out of the loss, so the others must be placed at signed
offsets from it; 5935 steps): 34.4% / 28.1%, with the moving texture 34.4% / 40.6%; heads 0 and 1
of every layer started as previous-/next-frame heads (`--shift-init 3`, 6500 steps): 31.3% / 31.3%,
the influence probe now falling off with distance a little (timestep 500: 0.034 at frame 1, 0.032
at frame 4); both together (6338 steps): 28.1% / 21.9%, colour down to 69%; a fading trail behind
the object (`--task trail=0.4`, one frame back, so a clip played backwards is no longer a clip of
the task; 6500 steps): 31.3% / 28.1%. On this teacher's fixed layout the trail does break the time
symmetry: backwards clips cost +11% at σ = 0.7 and 0.5, frame 0 (no trail yet) is told apart
(distance from the middle frame 0.39, from frame 4 0.11), yet the direction word stays unread
(swapping it: −0.1% to +0.1%) and direction accuracy is 21.9% / 15.6% (6500 steps). With the trail
stronger (`trail=0.7`) or with the head init added (`--shift-init 3`), 6000 steps each (cut by the
30 minutes): backwards clips +4% to +15%, the sign unread (±0.2%), direction 40.6% / 31.3% and
43.8% / 25.0%. These two do move the object: of 32 held-out samples 25 and 27 move along the
prompt's axis, about half of them the wrong way, against 13 that do not move at all for this
teacher. The second is shipped as `checkpoints/wan2.1-tiny-shapes-trail` (its own card). At these
budgets no try gets both skills.

Frame awareness is not what is missing, though. Telling the model which frame it predicts outright
(`--task frame_code=A`: every latent frame carries a constant along a direction orthogonal to the
colours, −A at frame 0 to +A at frame 4; this teacher's task and schedule, 3000 steps, 28 and 23
minutes on one thread beside other runs) makes it frame-aware: with A = 2 its σ = 1 predictions
differ between frames by 2.5–5.1 where the data's means do by 2.8–5.5 (A = 0.5: 0.67–1.37 against
1.07–1.79), and backwards clips cost it 300% to 7500% more loss. The direction word stays unread
all the same: swapping it for its opposite changes the loss by −0.11% to +0.09%, at σ = 1 it moves
the prediction by 0.14% (A = 2) and 0.21% (A = 0.5) against 20% and 29% for the colour word
(`word_influence`), and direction accuracy is 15.6% / 28.1% (A = 2) and 9.4% / 15.6% (A = 0.5).
What is missing is where in the frame a token is. On this layout the two signs of an axis cover the
same pixels in opposite order, so at σ = 1, where only the text can place the object, a model has to
put it at a word-dependent absolute position; Wan's blocks (RoPE, a patch embedding without padding)
see relative positions only, and absolute ones would have to be learned from the frame's edges.
Tested by giving the word a placement of its own (`--task lanes=true`: left / up keep to the lowest
row / column, right / down to the highest, with the trail and the head init of the moving teacher;
4,353 steps in 30 minutes beside other runs): the teacher ignores the direction word even for the
lane — swapping its sign moves the σ = 1 prediction by 0.17%, its axis by 0.13%, the colour 20% —
and its samples keep to no lane (the two left-moving ones of 16 held-out samples centred at rows
7–15 where the lane's centre is row 2.5), direction 31.3% / 40.6%. So a teacher of this size and budget learns no absolute placement,
which every word-dependent layout on this task needs. The shipped teachers read the sign as little
(0.30%; the moving one 0.48%, though it reads the axis: 16.7%, which a streak's orientation shows
locally).

Given both, it works. Trained with `--task frame_code=2 --task position_code=2` (on top of the frame
code, a fixed backdrop shading that says where each pixel is; this teacher's schedule, 14 minutes),
the teacher moves the object the way the prompt says on every held-out sample and reads the direction
word almost as much as the colour word. That teacher, `checkpoints/wan2.1-tiny-shapes-coded`, is the
default now (its own card). Fidelity measurements against the plain teacher are still meaningful —
the student must reproduce the teacher's samples, whatever they are — but its direction accuracy is
noise, not a skill.
"""


DEFAULT_NAME = "wan2.1-tiny-shapes-coded"
#: the teacher of the plain task (no codes): its card lists the tries that led to the default
PLAIN_NAME = "wan2.1-tiny-shapes"


def variant_note(r: dict) -> str:
    """The card's line on what differs from the plain task and training (empty if nothing)."""
    base = TaskConfig(text_dim=MODEL["text_dim"], channels=MODEL["in_channels"]).to_dict()
    task = [f"`{k}={v}`" for k, v in r["task"].items() if base.get(k) != v]
    train = [f"`--{k.replace('_', '-')} {r[k]}`" for k in ("frame_sigma_prob", "clean_frame_prob", "shift_init") if r.get(k)]
    if not task and not train:
        return ""
    return (f"\n- differs from the plain task and training (`{PLAIN_NAME}`): " + ", ".join(task + train)
            + " (see `synthetic.TaskConfig`, `--help`)")


def card(r: dict, name: str = DEFAULT_NAME) -> str:
    m, t = r["model"], r["task"]
    role = ("It is the default checkpoint the README's run\ncommand converts, and what `m4v-convert eval` / `ablate` "
            "measure against." if name == DEFAULT_NAME else
            f"It is an alternative to the default teacher\n`{DEFAULT_NAME}`"
            + (" (the tries that led to it are below)" if name == PLAIN_NAME else
               f" (the tries that led to it are on `{PLAIN_NAME}`'s card)")
            + "; `m4v-convert wan2.1 --checkpoint` and `eval`\ntake it the same way.")
    h, s = r["quality_heldout"], r["quality_train_prompts"]
    curve = r["loss_curve"]
    marks = [c for c in curve if c["step"] in (curve[0]["step"], 100, 250, 500, 1000)] + [curve[-1]]
    seen, rows = set(), []
    for c in marks:
        if c["step"] not in seen:
            seen.add(c["step"])
            rows.append(f"| {c['step']} | {c['loss']:.4f} | {c['seconds']:.0f} |")
    return f"""# {name}

A small **trained** text-to-video teacher in the real Wan2.1 layout (diffusers
`WanTransformer3DModel`: {m['num_layers']} layers, {m['num_attention_heads']} heads × {m['attention_head_dim']},
ffn {m['ffn_dim']}, text_dim {m['text_dim']}, {m['in_channels']} latent channels, patch (1, 2, 2); {r['params'] / 1e6:.2f} M
parameters). It generates **latents** of a synthetic task (`m4v_convert/synthetic.py`, config in
`task.json`): a coloured square or disc moving left/right/up/down over a constant background,
{t['frames']} latent frames of {t['height']}×{t['width']}, prompts like "a red square moving left" encoded
by a fixed word-embedding table (no T5, no VAE). {role}

## Training

- command: `{r['command']}` ({threads_text(r)}, `torch {r['torch']}`){stop_note(r)}
- seed {r['seed']}; {r['steps']} steps of batch {r['batch']}; AdamW lr {r['lr']} (warm-up {r['warmup']}, cosine to 5%{schedule_note(r)}),
  weight decay 0.01, grad clip 1; saved weights = EMA {r['ema']}
- objective: rectified flow, Wan convention: `x_t = (1 − σ)·x_0 + σ·ε`, `timestep = 1000·σ`,
  target `v = ε − x_0`, MSE; σ {r['sigma']} (shift {r['train_shift']})
- data: generated on the fly from the 40 training prompts (all colour × shape × direction
  combinations except the 8 held-out ones in `synthetic.HELDOUT`){variant_note(r)}
- wall time {r['train_seconds'] / 60:.1f} min; final loss (mean of the last {curve[-1]['step'] - curve[-2]['step'] if len(curve) > 1 else 1} steps) **{r['final_loss']:.4f}**

| step | loss | seconds |
|---:|---:|---:|
{chr(10).join(rows)}

Full curve in `training.json`.

## Sample quality (prompt adherence of its own samples)

Flow-match Euler sampler, {r['sample_steps']} steps, shift {r['sample_shift']}, no guidance; {r['eval_seeds_per_prompt']} noise seeds per
prompt; colour/direction read back from the generated latents by `ShapesTask.adherence`.

| prompts | colour accuracy | direction accuracy | adherence (mean) |
|---|---:|---:|---:|
| 8 held-out prompts (never trained on) | {h['colour_acc']:.1f}% | {h['direction_acc']:.1f}% | {h['score']:.1f} |
| 8 training prompts | {s['colour_acc']:.1f}% | {s['direction_acc']:.1f}% | {s['score']:.1f} |

Chance level is 1/6 for colour and 1/4 for direction ("none", no motion, always counts as wrong).

{motion_paragraph(r)}
`calib/shapes-calib.safetensors`: {r['calib_samples']} clean latents of training prompts + their text embeddings
(the `--calib` format of `m4v-convert wan2.1`; latents stored as {r.get('calib_dtype', 'float32')}), so the default
conversion distills on the teacher's own data distribution{calib_note(r)}.
"""


if __name__ == "__main__":
    main()
