"""Fidelity metrics of a student's samples against its teacher's: PSNR, SSIM, relative error and
percentile-bootstrap intervals. Pure tensor maths, shared by every backbone's eval and by ablate
(which samples, and how, is the eval job's business).
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from m4v_convert.errors import M4VError


def normalize_to(reference: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
    """Map every tensor with the affine map that sends ``reference``'s [min, max] to [0, 1]."""
    lo, hi = reference.min(), reference.max()
    scale = (hi - lo).clamp(min=1e-12)
    return [(x - lo) / scale for x in (reference, *xs)]


def psnr_of_mse(mse: float, data_range: float = 1.0) -> float:
    """``10·log10(data_range² / MSE)``; ``inf`` for an MSE of 0."""
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """``10·log10(data_range² / MSE)``; ``inf`` when identical."""
    return psnr_of_mse(float((x.double() - y.double()).pow(2).mean()), data_range)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r * r) / (2 * sigma * sigma))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 7, sigma: float | None = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM over the trailing two (H, W) dims of ``x`` and ``y`` (any leading dims).

    Local statistics with a ``win_size``² window (Gaussian of std ``sigma``, or uniform when
    ``sigma`` is None) at valid positions only; population (biased) variances, as in Wang et al.
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    h, w = x.shape[-2:]
    win = min(win_size, h, w)
    kernel = (_gaussian_window(win, sigma) if sigma else torch.full((win, win), 1.0 / (win * win), dtype=torch.float64))
    kernel = kernel.view(1, 1, win, win)
    a = x.double().reshape(-1, 1, h, w)
    b = y.double().reshape(-1, 1, h, w)

    def filt(t):
        return F.conv2d(t, kernel)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def pair_scores(xs_t: torch.Tensor, xs_s: torch.Tensor, with_ssim: bool = True) -> tuple[list[float], list[float]]:
    """Per sample pair (teacher, student): MSE and SSIM (empty list without ``with_ssim``) after mapping
    both with the teacher's [min, max] to [0, 1]."""
    mses, ssims = [], []
    for a, b in zip(xs_t, xs_s):
        na, nb = normalize_to(a, b)
        mses.append(float((na.double() - nb.double()).pow(2).mean()))
        if with_ssim:
            ssims.append(ssim(na, nb))
    return mses, ssims


def psnr_without(xs_t: torch.Tensor, xs_s: torch.Tensor, field: torch.Tensor) -> tuple[float, list[float]]:
    """Pooled PSNR and its bootstrap 95% interval of the samples minus a fixed ``field`` both carry
    (a task's codes): the error is the same, the range normalized over shrinks to the content's, so
    the PSNR is lower than with the field and comparable with a task that has none."""
    mses, _ = pair_scores(xs_t - field, xs_s - field, with_ssim=False)
    mse = sum(mses) / len(mses)
    (boot,) = resampled_means([mses])
    return psnr_of_mse(mse), psnr_ci95(boot)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖``."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


CI95 = (0.025, 0.975)


def resampled_means(rows: list, resamples: int = 2000, seed: int = 0) -> torch.Tensor:
    """(k, resamples) bootstrap means of k per-sample series of the same samples: every resample
    draws one set of sample indices (with replacement, seeded) for all k, so pairs stay together."""
    x = torch.tensor(rows, dtype=torch.float64)
    idx = torch.randint(x.shape[1], (resamples, x.shape[1]), generator=torch.Generator().manual_seed(seed))
    return x[:, idx].mean(dim=-1)


def bootstrap_ci95(mses: list[float], scores_teacher: list[float], scores_student: list[float],
                   resamples: int = 2000, seed: int = 0) -> dict:
    """Percentile-bootstrap 95% intervals of the pooled PSNR and of Δ adherence, resampling samples
    with replacement (each keeps its teacher/student pair)."""
    diff = [s - t for s, t in zip(scores_student, scores_teacher)]
    mse, delta = resampled_means([mses, diff], resamples, seed)
    q = torch.tensor(CI95, dtype=torch.float64)
    return {"psnr_db_ci95": psnr_ci95(mse), "adherence_delta_ci95": torch.quantile(delta, q).tolist(),
            "bootstrap": {"resamples": resamples, "seed": seed}}


def psnr_ci95(resampled_mse: torch.Tensor) -> list[float]:
    """95% interval of the pooled PSNR from bootstrap means of the per-sample MSE (data range 1)."""
    # PSNR falls as MSE rises: its 2.5% point is the MSE's 97.5% point (inf where MSE is 0)
    q = torch.tensor(CI95, dtype=torch.float64).flip(0)
    return (10 * torch.log10(1.0 / torch.quantile(resampled_mse, q))).tolist()


def paired_psnr_delta(reference: dict, other: dict, resamples: int = 2000, seed: int = 0) -> dict:
    """PSNR of ``other`` minus ``reference`` (two evals of the same samples, e.g. two ablation
    variants), with a paired percentile-bootstrap 95% interval: a resample draws the same samples
    for both, so the noise both share cancels and differences far below either interval show."""
    same = (len(reference["psnr_db_per_sample"]) == len(other["psnr_db_per_sample"])
            and reference["prompts"] == other["prompts"] and reference["seeds_per_prompt"] == other["seeds_per_prompt"])
    if not same:
        raise M4VError("paired PSNR: the two evals are not on the same samples")

    a, b = ([10 ** (-p / 10) for p in m["psnr_db_per_sample"]] for m in (reference, other))  # MSEs
    mse_a, mse_b = resampled_means([a, b], resamples, seed)
    q = torch.quantile(10 * torch.log10(mse_a / mse_b), torch.tensor(CI95, dtype=torch.float64))
    return {"psnr_delta_db": 10 * math.log10(sum(a) / sum(b)), "psnr_delta_db_ci95": q.tolist()}


def metrics_json(obj) -> str:
    """The text of a metrics.json file."""
    return json.dumps(obj, indent=2)  # Infinity for identical samples (json.loads reads it back)
