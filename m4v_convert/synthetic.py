"""A synthetic text-to-video task in latent space: coloured shapes moving in described directions.

Used to train the small teacher shipped in ``checkpoints/wan2.1-tiny-shapes`` (see
``scripts/train_teacher.py``) and, by ``m4v-convert eval`` / ``ablate``, to make held-out inputs
and to score prompt adherence of generated latents. No VAE is involved: samples are generated
directly as latents of shape (C, F, H, W).

**Videos.** Every sample is one constant background latent vector ``bg`` (drawn per sample,
``bg ~ N(0, background_std²)`` per channel; plus, with ``background_texture`` > 0, a static
per-pixel texture of that std, the same in every frame) with one object pasted over it: a square (side
``size``) or a disc (diameter ``size``) whose pixels hold the colour's latent vector, moving
``speed`` latent pixels per frame in the prompt's direction (with ``vae_time_stride`` s > 1, as
from Wan2.1's causal VAE, latent frame 0 is one instant and every later latent frame the average of
s instants since the previous one: the object blurred along its motion, pasted at fractional
positions by bilinear weights). Start positions are multiples of
``align`` (on Wan's 2×2 patch grid by default), keep the whole track inside the frame, and lie
within ``jitter`` pixels of the central admissible one (default 0: the layout is fixed per prompt
and only the background varies between seeds — a teacher trained for minutes on 2 CPU cores learns
that; with free positions it does not yet place one coherent object, see the teacher's card). Colour vectors are fixed by the task seed: orthonormal
directions of channel space (QR of a seeded Gaussian matrix; random unit directions when there are
fewer channels than colours) scaled to norm ``sqrt(C)·colour_scale``, i.e. per-channel RMS
``colour_scale``.

**Text.** Prompts are ``"a {colour} {shape} moving {direction}"``. The "text encoder" is a fixed
word-embedding table: one N(0, 1) vector of size ``text_dim`` per vocabulary word, drawn from
``seed + 1``; a prompt becomes (``text_len``, ``text_dim``) with one row per word and zero rows of
padding after them (as Wan pipelines pad T5 outputs, so the converted model's padding mask works).
Every word belongs to one role (colour, shape, direction, filler), so word order carries no
information and no positional term is needed.

**Flow matching (Wan / diffusers convention).** ``x_t = (1 − σ)·x_0 + σ·ε``, ``timestep = 1000·σ``,
the model predicts ``v = ε − x_0``; sampling integrates ``dx/dσ = v`` from σ = 1 (pure noise) to
σ = 0 with Euler steps over ``σ_i = shift(linspace(1, 0, N + 1))``, ``shift(σ) = sσ/(1 + (s − 1)σ)``.

**Adherence.** :func:`adherence` reads colour and direction back from latents: the background of
every frame is the per-channel median over pixels; a pixel belongs to the object where its
distance to the background exceeds half the frame's largest distance; colour = the colour vector
nearest (Euclidean) to the mean object latent over all frames; direction = the sign of the
dominant axis of the least-squares slope of the object's centroid over frames (slower than
``min_speed`` pixels per frame on both axes counts as "none", which is always wrong).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from m4v_convert.errors import M4VError

#: colour name → RGB in [-1, 1], used only to display latents (see :meth:`ShapesTask.rgb_projection`).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0), "purple": (1.0, -1.0, 1.0), "cyan": (-1.0, 1.0, 1.0),
}
SHAPES = ("square", "disc")
#: direction → (dy, dx) per frame, in latent pixels (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
FILLER = ("a", "moving")
VOCAB = (*FILLER, *COLOURS, *SHAPES, *DIRECTIONS)

#: prompts never shown during the teacher's training (the default held-out set of ``eval``);
#: every colour, shape and direction still occurs in training, in other combinations.
HELDOUT = (
    ("red", "disc", "up"), ("green", "square", "left"), ("blue", "disc", "right"), ("yellow", "square", "down"),
    ("purple", "disc", "left"), ("cyan", "square", "up"), ("red", "square", "right"), ("blue", "square", "down"),
)
#: eval noise/layout seeds start here; training draws from its own generator (seeded separately).
EVAL_SEED_BASE = 1_000_000


@dataclass(frozen=True)
class Labels:
    colour: str
    shape: str
    direction: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"


def all_labels() -> list[Labels]:
    return [Labels(c, s, d) for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS)]


def train_labels() -> list[Labels]:
    held = {Labels(*h) for h in HELDOUT}
    return [lab for lab in all_labels() if lab not in held]


def heldout_labels() -> list[Labels]:
    return [Labels(*h) for h in HELDOUT]


def parse_prompt(prompt: str, where: str = "prompt") -> Labels:
    """``"a red square moving left"`` → Labels; words may come in any order, shape defaults to square."""
    words = prompt.lower().split()
    unknown = [w for w in words if w not in VOCAB]
    if unknown:
        raise M4VError(f"{where}: unknown word {unknown[0]!r} in {prompt!r} (vocabulary: {', '.join(VOCAB)})")
    found = {}
    for role, names in (("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS)):
        hits = [w for w in words if w in names]
        if len(hits) > 1:
            raise M4VError(f"{where}: {prompt!r} names more than one {role} ({', '.join(hits)})")
        found[role] = hits[0] if hits else None
    for role in ("colour", "direction"):
        if found[role] is None:
            raise M4VError(f"{where}: {prompt!r} names no {role} (expected e.g. 'a red square moving left')")
    return Labels(found["colour"], found["shape"] or "square", found["direction"])


def read_prompts(path: Path) -> list[Labels]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise M4VError(f"--prompts {path}: no such file")
    labels = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            labels.append(parse_prompt(line, f"--prompts {path}:{n}"))
    if not labels:
        raise M4VError(f"--prompts {path}: no prompts (one per line, e.g. 'a red square moving left')")
    return labels


@dataclass(frozen=True)
class TaskConfig:
    channels: int = 16
    frames: int = 5
    height: int = 16
    width: int = 16
    text_len: int = 8
    text_dim: int = 64
    size: int = 6  # object side / diameter in latent pixels
    speed: int = 2  # latent pixels per frame
    align: int = 2  # start positions are multiples of this (2 = on Wan's 2x2 patch grid)
    jitter: int = 0  # start positions within this many px of the central one (0: fixed layout per prompt)
    cross_jitter: int = -1  # the same across the motion (-1: = jitter)
    texture: float = 0.0  # std of a random per-video texture the object carries (moves with it)
    background_texture: float = 0.0  # std of a random per-video texture on the background (static)
    # video frames per latent frame after the first, as in Wan2.1's causal VAE (4): latent frame 0 is
    # one sharp instant, every later one the average of the object over its video frames (motion blur)
    vae_time_stride: int = 1
    # strength of a fading copy of the object where it was one latent frame earlier (frames after the
    # first): a streak behind it, so a single frame shows which way it moves and a clip played
    # backwards is no longer a clip of the task
    trail: float = 0.0
    # per-channel RMS of a per-frame constant added to every pixel, along a fixed latent direction
    # orthogonal to the colours, from −frame_code (first frame) to +frame_code (last): the latents say
    # which frame they are, a stand-in for what tells a real Wan2.1 where it is in time (the causal
    # VAE's distinct first frame), which a teacher trained for minutes does not learn from RoPE alone
    frame_code: float = 0.0
    # the same for space: two fixed ramps along latent directions orthogonal to the colours and the
    # frame code, −position_code (top row / left column) to +position_code (bottom / right), the
    # background's part along them removed: a fixed, lit backdrop whose shading says where a pixel is,
    # which RoPE attention over a constant background cannot see (it sees relative offsets only)
    position_code: float = 0.0
    # across the motion the object keeps to a lane set by the direction's sign (left / up: the lowest
    # admissible row / column, right / down: the highest) instead of the middle: with a fixed layout
    # the two signs of an axis otherwise cover the same pixels in opposite order, so no time-averaged
    # placement tells them apart, and a teacher never needs to read the word or to know where it is
    lanes: bool = False
    colour_scale: float = 1.0  # per-channel RMS of a colour vector
    background_std: float = 0.5
    seed: int = 0  # fixes colour vectors and the word table

    def to_dict(self) -> dict:
        return {"task": "shapes", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskConfig":
        d = dict(d)
        if d.pop("task", "shapes") != "shapes":
            raise M4VError("task config: not a 'shapes' task")
        known = {f.name for f in dataclasses.fields(cls)}
        if set(d) - known:
            raise M4VError(f"task config: unknown fields {sorted(set(d) - known)}")
        return cls(**d)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "TaskConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise M4VError(f"{path}: invalid task config ({e})") from None


class ShapesTask:
    """Generator, text encoder and adherence metric of one :class:`TaskConfig`."""

    def __init__(self, config: TaskConfig | None = None):
        self.config = c = config or TaskConfig()
        track = c.size + c.speed * (c.frames - 1)
        if track > min(c.height, c.width):
            raise M4VError(f"task: an object of size {c.size} moving {c.speed} px/frame for {c.frames} frames "
                           f"leaves a {c.height}x{c.width} frame")
        if c.align < 1 or not any(v % c.align == 0 for v in range(track - c.size, min(c.height, c.width) - c.size + 1)):
            raise M4VError(f"task: no start position is a multiple of align={c.align}")
        if c.vae_time_stride < 1:
            raise M4VError(f"task: vae_time_stride must be >= 1, got {c.vae_time_stride}")
        if c.text_len < 5:
            raise M4VError(f"task: text_len must be >= 5 (words per prompt), got {c.text_len}")
        g = torch.Generator().manual_seed(c.seed)
        m = torch.randn(c.channels, len(COLOURS), generator=g, dtype=torch.float64)
        if c.channels >= len(COLOURS):
            m, _ = torch.linalg.qr(m)
        else:
            m = m / m.norm(dim=0, keepdim=True)
        self.colour_vectors = (m.T * math.sqrt(c.channels) * c.colour_scale).float()  # (K, C)
        code = torch.randn(c.channels, generator=torch.Generator().manual_seed(c.seed + 2), dtype=torch.float64)
        if c.channels > len(COLOURS):  # orthogonal to every colour, so colour read-back is unchanged
            code = code - m @ (m.T @ code)
        self.frame_code_vector = (code / code.norm() * math.sqrt(c.channels)).float()  # (C,), per-channel RMS 1
        # position-code directions (y, x): orthonormal, orthogonal to the colours and the frame code
        pos = torch.randn(c.channels, 2, generator=torch.Generator().manual_seed(c.seed + 3), dtype=torch.float64)
        if c.position_code and c.channels < len(COLOURS) + 3:
            raise M4VError(f"task: position_code needs at least {len(COLOURS) + 3} channels, got {c.channels}")
        if c.position_code:
            basis = torch.cat([m, (code / code.norm())[:, None]], dim=1)
            pos = pos - basis @ (basis.T @ pos)
            pos, _ = torch.linalg.qr(pos)
        self.position_code_basis = pos.float()  # (C, 2), orthonormal columns when position_code is on
        gw = torch.Generator().manual_seed(c.seed + 1)
        self.word_table = torch.randn(len(VOCAB), c.text_dim, generator=gw)  # (V, text_dim)
        self.colour_names = list(COLOURS)
        self.direction_names = list(DIRECTIONS)

    # ------------------------------------------------------------------ text
    def encode(self, prompts: list[str] | list[Labels]) -> torch.Tensor:
        """Prompts → (B, text_len, text_dim), one row per word, zero padding rows after."""
        c = self.config
        out = torch.zeros(len(prompts), c.text_len, c.text_dim)
        for i, p in enumerate(prompts):
            text = p.prompt if isinstance(p, Labels) else p
            words = text.lower().split()
            if len(words) > c.text_len:
                raise M4VError(f"prompt {text!r}: {len(words)} words, more than text_len {c.text_len}")
            for j, w in enumerate(words):
                if w not in VOCAB:
                    raise M4VError(f"prompt {text!r}: unknown word {w!r} (vocabulary: {', '.join(VOCAB)})")
                out[i, j] = self.word_table[VOCAB.index(w)]
        return out

    # ------------------------------------------------------------------ videos
    def object_mask(self, shape: str, y: float, x: float) -> torch.Tensor:
        """(H, W) float mask of ``shape`` with its top-left corner at (y, x)."""
        c = self.config
        yy = torch.arange(c.height, dtype=torch.float32).view(-1, 1)
        xx = torch.arange(c.width, dtype=torch.float32).view(1, -1)
        if shape == "square":
            inside = (yy >= y) & (yy < y + c.size) & (xx >= x) & (xx < x + c.size)
        elif shape == "disc":
            r = c.size / 2
            inside = (yy + 0.5 - (y + r)) ** 2 + (xx + 0.5 - (x + r)) ** 2 <= r * r
        else:
            raise ValueError(f"unknown shape {shape!r}")
        return inside.float()

    def video(self, labels: Labels, generator: torch.Generator) -> torch.Tensor:
        """One clean latent video (C, F, H, W) for ``labels``; layout and background from ``generator``."""
        c = self.config
        dy, dx = DIRECTIONS[labels.direction]
        travel = c.speed * (c.frames - 1)

        def start(step: int, extent: int, lane: int = 0) -> int:
            lo = travel if step < 0 else 0
            hi = extent - c.size - (travel if step > 0 else 0)
            jitter = c.jitter if step != 0 or c.cross_jitter < 0 else c.cross_jitter
            choices = [v for v in range(lo, hi + 1) if v % c.align == 0]
            centre = choices[0 if lane < 0 else -1] if lane else choices[len(choices) // 2]
            choices = [v for v in choices if abs(v - centre) <= jitter]
            return choices[int(torch.randint(len(choices), (1,), generator=generator))]

        lane_y, lane_x = (dx, dy) if c.lanes else (0, 0)  # the cross axis's lane: the motion's sign
        y0, x0 = start(dy, c.height, lane_y), start(dx, c.width, lane_x)
        bg = torch.randn(c.channels, generator=generator) * c.background_std
        if c.position_code:  # the backdrop's shading is fixed: no per-video offset along its directions
            u = self.position_code_basis
            bg = bg - u @ (u.T @ bg)
        colour = self.colour_vectors[self.colour_names.index(labels.colour)]
        patch = colour.view(-1, 1, 1).expand(-1, c.size, c.size)
        if c.texture > 0:
            patch = patch + c.texture * torch.randn(c.channels, c.size, c.size, generator=generator)
        m = self.object_mask(labels.shape, 0, 0)[: c.size, : c.size]
        out = bg.view(-1, 1, 1, 1).repeat(1, c.frames, c.height, c.width)
        if c.background_texture > 0:  # the same pixels in every frame: a static scene behind the object
            out += c.background_texture * torch.randn(c.channels, 1, c.height, c.width, generator=generator)
        stride = c.vae_time_stride

        def coverage(instants: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
            """(H, W) cover and (C, H, W) paint of the object averaged over ``instants`` (frames)."""
            cover = torch.zeros(c.height, c.width)
            paint = torch.zeros(c.channels, c.height, c.width)
            for t in instants:
                for (y, x), wgt in _bilinear(y0 + dy * c.speed * t, x0 + dx * c.speed * t):
                    cover[y:y + c.size, x:x + c.size] += wgt * m / len(instants)
                    paint[:, y:y + c.size, x:x + c.size] += wgt * patch * m / len(instants)
            return cover, paint

        for f in range(c.frames):
            if c.trail > 0 and f > 0:  # the streak first, the object painted over it
                cover, paint = coverage([float(f - 1)])
                out[:, f] = out[:, f] * (1 - c.trail * cover) + c.trail * paint
            # the instants this latent frame averages, in latent frames: f alone for the first frame
            # (or without a VAE stride), else the stride's video frames since latent frame f − 1
            instants = [float(f)] if f == 0 or stride == 1 else [f - 1 + j / stride for j in range(1, stride + 1)]
            cover, paint = coverage(instants)
            out[:, f] = out[:, f] * (1 - cover) + paint
        if c.frame_code:
            out += self.frame_code_field()
        if c.position_code:
            out += self.position_code_field().unsqueeze(1)
        return out

    @property
    def has_codes(self) -> bool:
        return bool(self.config.frame_code or self.config.position_code)

    def frame_code_field(self) -> torch.Tensor:
        """(C, F, 1, 1) the per-frame constant of ``frame_code`` (zeros when it is off)."""
        c = self.config
        ramp = torch.linspace(-c.frame_code, c.frame_code, c.frames)
        return self.frame_code_vector.view(-1, 1, 1, 1) * ramp.view(1, -1, 1, 1)

    def code_field(self) -> torch.Tensor:
        """(C, F, H, W) what the frame and position codes add to every video of the task: fixed, the
        same for every prompt and seed, so subtracting it leaves the content (zeros when both are off)."""
        return self.frame_code_field() + self.position_code_field().unsqueeze(1)

    def position_code_field(self) -> torch.Tensor:
        """(C, H, W) the fixed backdrop shading of ``position_code`` (zeros when it is off)."""
        c = self.config
        if not c.position_code:
            return torch.zeros(c.channels, c.height, c.width)
        ry = torch.linspace(-c.position_code, c.position_code, c.height).view(-1, 1).expand(-1, c.width)
        rx = torch.linspace(-c.position_code, c.position_code, c.width).view(1, -1).expand(c.height, -1)
        scale = math.sqrt(c.channels)  # per-channel RMS position_code at the edges, as the frame code
        u = self.position_code_basis
        return scale * (u[:, 0].view(-1, 1, 1) * ry + u[:, 1].view(-1, 1, 1) * rx)

    def batch(self, labels: list[Labels], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (B, C, F, H, W), text (B, text_len, text_dim))."""
        return torch.stack([self.video(lab, generator) for lab in labels]), self.encode(labels)

    def eval_batch(self, labels: list[Labels], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic held-out clean latents: sample i uses seed ``EVAL_SEED_BASE + seeds[i]``."""
        vids = [self.video(lab, torch.Generator().manual_seed(EVAL_SEED_BASE + s)) for lab, s in zip(labels, seeds)]
        return torch.stack(vids), self.encode(labels)

    # ------------------------------------------------------------------ adherence
    @torch.no_grad()
    def read_back(self, latents: torch.Tensor, min_speed: float = 0.25) -> list[tuple[str, str]]:
        """(B, C, F, H, W) latents → [(colour, direction)] read from the pixels (see module doc)."""
        x = latents.float()
        b, ch, f, h, w = x.shape
        if ch != self.config.channels:
            raise M4VError(f"adherence: latents have {ch} channels, the task has {self.config.channels}")
        if self.config.position_code:  # the backdrop shading is not the object: read the rest
            u = self.position_code_basis
            x = x - torch.einsum("ck,dk,bdfhw->bcfhw", u, u, x)
        bg = x.flatten(3).median(dim=-1).values  # (B, C, F)
        dev = (x - bg[..., None, None]).norm(dim=1)  # (B, F, H, W)
        peak = dev.flatten(2).max(-1).values[..., None, None]  # (B, F, 1, 1)
        weight = (dev - 0.5 * peak).clamp(min=0)  # (B, F, H, W)
        mask = weight > 0
        yy = torch.arange(h, dtype=torch.float32).view(1, 1, -1, 1)
        xx = torch.arange(w, dtype=torch.float32).view(1, 1, 1, -1)
        mass = weight.sum((2, 3)).clamp(min=1e-12)  # (B, F)
        cy = (weight * yy).sum((2, 3)) / mass
        cx = (weight * xx).sum((2, 3)) / mass
        t = torch.arange(f, dtype=torch.float32)
        t = t - t.mean()
        denom = (t * t).sum().clamp(min=1e-12)
        vy = ((cy - cy.mean(1, keepdim=True)) * t).sum(1) / denom
        vx = ((cx - cx.mean(1, keepdim=True)) * t).sum(1) / denom
        out = []
        for i in range(b):
            m = mask[i].unsqueeze(0).expand(ch, -1, -1, -1)
            obj = x[i][m].view(ch, -1).mean(1)
            colour = self.colour_names[int((self.colour_vectors - obj).norm(dim=1).argmin())]
            if max(abs(vx[i]), abs(vy[i])) < min_speed:
                direction = "none"
            elif abs(vx[i]) >= abs(vy[i]):
                direction = "right" if vx[i] > 0 else "left"
            else:
                direction = "down" if vy[i] > 0 else "up"
            out.append((colour, direction))
        return out

    def adherence(self, latents: torch.Tensor, labels: list[Labels]) -> dict:
        """Colour / direction accuracy (%) of ``latents`` against the prompts' ``labels``;
        ``score`` is their mean."""
        got = self.read_back(latents)
        colour = 100.0 * sum(g[0] == lab.colour for g, lab in zip(got, labels)) / len(labels)
        direction = 100.0 * sum(g[1] == lab.direction for g, lab in zip(got, labels)) / len(labels)
        return {"colour_acc": colour, "direction_acc": direction, "score": (colour + direction) / 2,
                "read": [list(g) for g in got]}

    # ------------------------------------------------------------------ display
    def rgb_projection(self) -> torch.Tensor:
        """(3, C) fixed projection sending each colour vector to its named RGB in [-1, 1]
        (least squares through the colour vectors); display as ``0.5 + 0.5·P·x`` clipped."""
        rgb = torch.tensor([COLOURS[n] for n in self.colour_names], dtype=torch.float64)  # (K, 3)
        return (torch.linalg.pinv(self.colour_vectors.double()) @ rgb).T.float()  # (3, C)

    def to_rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """(..., C, F, H, W) → (..., F, H, W, 3) in [0, 1]."""
        p = self.rgb_projection()
        rgb = torch.einsum("kc,...cfhw->...fhwk", p, latents.float())
        return (0.5 + 0.5 * rgb).clamp(0, 1)


def _bilinear(y: float, x: float) -> list[tuple[tuple[int, int], float]]:
    """A paste at fractional (y, x) as weighted pastes at integer corners (weights sum to 1)."""
    y_lo, x_lo = math.floor(y), math.floor(x)
    fy, fx = y - y_lo, x - x_lo
    corners = [((y_lo, x_lo), (1 - fy) * (1 - fx)), ((y_lo + 1, x_lo), fy * (1 - fx)),
               ((y_lo, x_lo + 1), (1 - fy) * fx), ((y_lo + 1, x_lo + 1), fy * fx)]
    return [(yx, w) for yx, w in corners if w > 0]


# ---------------------------------------------------------------------- flow matching


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(steps: int, shift: float) -> torch.Tensor:
    """σ_0 = 1 > σ_1 > ... > σ_steps = 0 (shifted linspace, as diffusers' flow-match Euler)."""
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1), shift)


@torch.no_grad()
def euler_sample(model, noise: torch.Tensor, text: torch.Tensor, steps: int = 20, shift: float = 3.0,
                 batch_size: int | None = None, on_batch=None, stop: int | None = None) -> torch.Tensor:
    """Flow-match Euler sampler: x ← x + (σ_next − σ)·v(x, 1000σ), from σ = 1 to 0.

    ``on_batch(n)``: called after each batch of ``n`` samples is done (progress display).
    ``stop``: return the state after that many of the ``steps`` steps (at σ = ``sample_sigmas(steps,
    shift)[stop]``) instead of the sample.
    """
    sigmas = sample_sigmas(steps, shift)
    outs = []
    bs = batch_size or noise.shape[0]
    dtype = next(model.parameters()).dtype
    for s in range(0, noise.shape[0], bs):
        x = noise[s:s + bs].float()
        txt = text[s:s + bs]
        for i in range(steps if stop is None else stop):
            t = torch.full((x.shape[0],), float(sigmas[i]) * 1000.0, device=x.device)
            v = model(hidden_states=x.to(dtype), timestep=t.to(dtype), encoder_hidden_states=txt.to(dtype),
                      return_dict=False)[0].float()
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        outs.append(x)
        if on_batch is not None:
            on_batch(x.shape[0])
    return torch.cat(outs)
