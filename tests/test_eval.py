"""Fidelity tooling: the synthetic shapes task, its adherence metric, PSNR/SSIM, eval and ablate."""

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel
from m4v_convert.errors import M4VError
from m4v_convert.jobs.eval import EvalSettings, eval_work, evaluate, sample
from m4v_convert.metrics import bootstrap_ci95, normalize_to, paired_psnr_delta, psnr, ssim
from m4v_convert.io.converted import save_converted
from m4v_convert.synthetic import (
    Labels, ShapesTask, TaskConfig, all_labels, heldout_labels, parse_prompt, read_prompts, train_labels,
)
from m4v_convert.backbones.wan.testing import make_tiny_wan, save_tiny_wan

runner = CliRunner()
TINY_MMDIM = {"bc_norm": "across_groups", "rotary": True, "temporal_causal": False, "temporal_dim": 8,
              "temporal_heads": 2}


# ------------------------------------------------------------------ synthetic task + adherence


def test_task_is_deterministic_and_prompts_are_split():
    a, b = ShapesTask(TaskConfig(seed=3)), ShapesTask(TaskConfig(seed=3))
    assert torch.equal(a.colour_vectors, b.colour_vectors) and torch.equal(a.word_table, b.word_table)
    assert not torch.equal(a.colour_vectors, ShapesTask(TaskConfig(seed=4)).colour_vectors)
    labs = all_labels()[:6]
    xa, ta = a.batch(labs, torch.Generator().manual_seed(7))
    xb, tb = b.batch(labs, torch.Generator().manual_seed(7))
    assert torch.equal(xa, xb) and torch.equal(ta, tb)
    assert not torch.equal(xa, a.batch(labs, torch.Generator().manual_seed(8))[0])
    assert torch.equal(a.eval_batch(labs, [0] * 6)[0], b.eval_batch(labs, [0] * 6)[0])
    # text: one row per word, zero padding rows after (the converted model's padding mask)
    assert (ta.ne(0).any(-1).sum(1) == 5).all() and ta[:, 5:].abs().sum() == 0
    assert set(heldout_labels()).isdisjoint(train_labels()) and len(train_labels()) + len(heldout_labels()) == 48
    assert parse_prompt("a blue disc moving up") == Labels("blue", "disc", "up")


def test_adherence_recovers_labels_on_clean_latents_and_fails_on_shuffled():
    task = ShapesTask(TaskConfig())
    labs = all_labels()
    x, _ = task.batch(labs, torch.Generator().manual_seed(0))
    oracle = task.adherence(x, labs)
    assert oracle["colour_acc"] == 100.0 and oracle["direction_acc"] == 100.0
    # time reversed: every direction flips
    assert task.adherence(x.flip(2), labs)["direction_acc"] == 0.0
    # pixels shuffled independently in each frame: no coherent motion
    g = torch.Generator().manual_seed(1)
    b, c, f, h, w = x.shape
    flat = x.reshape(b, c, f, h * w).clone()
    for i in range(b):
        for j in range(f):
            flat[i, :, j] = flat[i, :, j, torch.randperm(h * w, generator=g)]
    assert task.adherence(flat.reshape(x.shape), labs)["direction_acc"] < 50.0
    # channels permuted: colours no longer match their vectors
    perm = torch.randperm(c, generator=g)
    assert task.adherence(x[:, perm], labs)["colour_acc"] < 50.0
    # labels shuffled against the same latents
    shuffled = [labs[i] for i in torch.randperm(len(labs), generator=g).tolist()]
    assert task.adherence(x, shuffled)["score"] < 50.0


def test_background_texture_is_static_and_under_the_object():
    base = TaskConfig(jitter=0)
    plain, textured = ShapesTask(base), ShapesTask(TaskConfig(jitter=0, background_texture=0.3))
    lab = Labels("red", "square", "right")
    x0 = plain.video(lab, torch.Generator().manual_seed(5))
    x1 = textured.video(lab, torch.Generator().manual_seed(5))
    colour = textured.colour_vectors[textured.colour_names.index("red")]
    on_object = (x0 - colour.view(-1, 1, 1, 1)).abs().amax(0) == 0  # (F, H, W); plain: background is constant
    # the object's pixels are untouched; everywhere else the texture is the same in every frame
    assert torch.equal(x1[:, on_object], x0[:, on_object])
    never = ~on_object.any(0)  # pixels no frame's object covers
    tex = x1 - x0  # the texture alone, off the object
    assert torch.equal(tex[:, :, never], tex[:, :1, never].expand(-1, base.frames, -1))
    assert abs(tex[:, 0, never].std().item() - 0.3) < 0.05 and tex[:, 0, never].abs().min() > 0
    # adherence still reads the object back on textured clean latents
    labs = all_labels()
    x, _ = textured.batch(labs, torch.Generator().manual_seed(0))
    assert textured.adherence(x, labs)["score"] == 100.0


# ------------------------------------------------------------------ PSNR / SSIM


def test_psnr_and_normalization_against_hand_values():
    assert psnr(torch.zeros(4, 4), torch.full((4, 4), 0.1)) == pytest.approx(20.0)
    assert psnr(torch.zeros(10), torch.tensor([0.5] + [0.0] * 9)) == pytest.approx(10 * math.log10(1 / 0.025))
    assert psnr(torch.ones(3), torch.ones(3)) == math.inf
    ref, other = normalize_to(torch.tensor([2.0, 3.0, 4.0]), torch.tensor([3.0, 5.0]))
    assert ref.tolist() == [0.0, 0.5, 1.0] and other.tolist() == [0.5, 1.5]


def test_ssim_against_hand_values():
    # one 7x7 window with uniform weights = the global SSIM formula
    x = torch.arange(49, dtype=torch.float64).reshape(7, 7) / 48
    y = x ** 2
    mx, my = x.mean(), y.mean()
    vx, vy = ((x - mx) ** 2).mean(), ((y - my) ** 2).mean()
    cxy = ((x - mx) * (y - my)).mean()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    want = float((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    assert ssim(x, y, win_size=7, sigma=None) == pytest.approx(want, rel=1e-12)
    # constant images: only the luminance term remains
    a, b = torch.full((8, 8), 0.2), torch.full((8, 8), 0.6)
    assert ssim(a, b) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1), rel=1e-6)
    z = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert ssim(z, z) == pytest.approx(1.0) and ssim(z, z.flip(-1)) < 0.5


# ------------------------------------------------------------------ eval


@pytest.fixture(scope="module")
def teacher():
    return make_tiny_wan(seed=1)


def _student(teacher, layers):
    student = M4VWanTransformer3DModel.from_teacher(teacher)
    if layers:
        student.convert_(layers, TINY_MMDIM)
    return student.eval()


SMALL = dict(seeds=1, steps=3)
#: a small task for the tiny model (3 latent frames of 8x8) keeps these tests fast
TINY_TASK = TaskConfig(channels=4, text_dim=32, frames=3, height=8, width=8, size=3, speed=2, align=1)


def test_eval_teacher_vs_itself_is_exact_and_vs_converted_is_not(teacher):
    task = ShapesTask(TINY_TASK)
    settings = EvalSettings(labels=heldout_labels()[:2], **SMALL)
    same, xs_t, xs_s = evaluate(teacher, _student(teacher, []), task, settings)
    assert same["psnr_db"] == math.inf and same["ssim"] == pytest.approx(1.0)
    assert all(v == 0.0 for v in same["pred_rel_error"].values()) and same["sample_rel_error"] == 0.0
    assert same["adherence_delta_points"] == 0.0 and same["agreement"] == 100.0 and torch.equal(xs_t, xs_s)
    other, _, _ = evaluate(teacher, _student(teacher, [0, 1]), task, settings)
    assert math.isfinite(other["psnr_db"]) and other["ssim"] < 1.0
    assert all(v > 0.0 for v in other["pred_rel_error"].values())


def test_eval_of_a_coded_task_reports_the_psnr_of_the_content_too(teacher):
    import dataclasses

    from m4v_convert.metrics import psnr_without

    settings = EvalSettings(labels=heldout_labels()[:2], **SMALL)
    plain, _, _ = evaluate(teacher, _student(teacher, [0]), ShapesTask(TINY_TASK), settings)
    assert "psnr_db_without_codes" not in plain
    task = ShapesTask(dataclasses.replace(TINY_TASK, frame_code=3.0))
    coded, xs_t, xs_s = evaluate(teacher, _student(teacher, [0]), task, settings)
    want, ci = psnr_without(xs_t, xs_s, task.code_field())
    assert coded["psnr_db_without_codes"] == want and coded["psnr_db_without_codes_ci95"] == ci


def test_psnr_without_a_fixed_field_is_the_psnr_of_the_content():
    from m4v_convert.metrics import pair_scores, psnr_without

    g = torch.Generator().manual_seed(0)
    xs_t = torch.randn(6, 4, 3, 8, 8, generator=g)
    xs_s = xs_t + 0.05 * torch.randn(6, 4, 3, 8, 8, generator=g)
    field = 5 * torch.randn(4, 3, 8, 8, generator=g)  # a fixed field far wider than the content
    content = 10 * math.log10(1 / (sum(pair_scores(xs_t, xs_s, with_ssim=False)[0]) / 6))
    got, (lo, hi) = psnr_without(xs_t + field, xs_s + field, field)
    assert got == pytest.approx(content, rel=1e-7) and lo < got < hi
    carried = 10 * math.log10(1 / (sum(pair_scores(xs_t + field, xs_s + field)[0]) / 6))
    assert carried > content + 6  # the same error over the field's wider range reads as a higher PSNR
    assert psnr_without(xs_t + field, xs_t + field, field)[0] == math.inf


def test_code_field_is_what_the_codes_add_to_every_clip():
    task = ShapesTask(TaskConfig(frame_code=0.4, position_code=0.7))
    assert task.has_codes and not ShapesTask(TaskConfig()).has_codes
    assert torch.equal(ShapesTask(TaskConfig()).code_field(), torch.zeros(16, 5, 16, 16))
    u, v = task.position_code_basis, task.frame_code_vector
    for seed, lab in enumerate([Labels("red", "disc", "left"), Labels("blue", "square", "up")]):
        rest = task.video(lab, torch.Generator().manual_seed(seed)) - task.code_field()
        # the backdrop's part along the position directions is all code; along the frame direction
        # what is left at a corner the object never reaches is the background's own part, every frame alike
        assert torch.einsum("ck,cfhw->kfhw", u, rest).abs().max() < 1e-5
        corner = torch.einsum("c,cf->f", v, rest[:, :, 0, 0])
        torch.testing.assert_close(corner, corner[:1].expand_as(corner), atol=1e-5, rtol=0)
        coded_corner = torch.einsum("c,cf->f", v, task.video(lab, torch.Generator().manual_seed(seed))[:, :, 0, 0])
        assert (coded_corner[-1] - coded_corner[0]).item() == pytest.approx(0.8 * v.norm().item() ** 2, rel=1e-4)  # the ramp: −0.4 → +0.4


def test_bootstrap_intervals_match_the_sampling_distribution():
    # identical pairs: PSNR is infinite in every resample, Δ adherence exactly 0
    same = bootstrap_ci95([0.0] * 8, [50.0] * 8, [50.0] * 8)
    assert same["psnr_db_ci95"] == [math.inf, math.inf] and same["adherence_delta_ci95"] == [0.0, 0.0]
    # the same MSE everywhere: no spread, the interval is the point
    flat = bootstrap_ci95([1e-3] * 50, [0.0] * 50, [0.0] * 50)
    assert flat["psnr_db_ci95"] == pytest.approx([30.0, 30.0])
    # half the pairs differ by +50 points: the mean 25 has standard error 25/sqrt(n), so the 95%
    # interval is 25 ± 1.96·25/sqrt(n) (normal approximation, n = 400: ± 2.45)
    n = 400
    ci = bootstrap_ci95([1e-3] * n, [0.0] * n, [50.0 * (i % 2) for i in range(n)], resamples=4000)
    half = 1.96 * 25 / math.sqrt(n)
    assert ci["adherence_delta_ci95"] == pytest.approx([25 - half, 25 + half], abs=0.4)
    # and PSNR: a mixture of two MSEs, the interval brackets the pooled value and is not empty
    mixed = bootstrap_ci95([1e-3, 4e-3] * 100, [0.0] * 200, [0.0] * 200)
    pooled = 10 * math.log10(1 / 2.5e-3)
    assert mixed["psnr_db_ci95"][0] < pooled < mixed["psnr_db_ci95"][1] < pooled + 0.5


def test_paired_psnr_delta_cancels_the_noise_both_evals_share():
    # per-sample MSEs spread over two decades, the other eval exactly 10% lower MSE on every sample:
    # the pooled difference is 10·log10(1/0.9) and every paired resample gives the same number,
    # while each eval's own interval is wide
    mse = [10 ** (-2 - 2 * (i % 7) / 6) for i in range(70)]
    meta = {"prompts": ["a red square moving left"], "seeds_per_prompt": 70}
    ref = {**meta, "psnr_db_per_sample": [10 * math.log10(1 / m) for m in mse]}
    other = {**meta, "psnr_db_per_sample": [10 * math.log10(1 / (0.9 * m)) for m in mse]}
    d = paired_psnr_delta(ref, other)
    assert d["psnr_delta_db"] == pytest.approx(10 * math.log10(1 / 0.9))
    assert d["psnr_delta_db_ci95"] == pytest.approx([10 * math.log10(1 / 0.9)] * 2)
    lo, hi = bootstrap_ci95(mse, [0.0] * 70, [0.0] * 70)["psnr_db_ci95"]
    assert hi - lo > 1.0
    with pytest.raises(M4VError, match="same samples"):
        paired_psnr_delta(ref, {**other, "seeds_per_prompt": 35})


def test_eval_progress_reaches_the_declared_totals(teacher):
    task = ShapesTask(TINY_TASK)
    # 3 prompts x 3 seeds in batches of 4: the last batch is short, the counts must still add up
    settings = EvalSettings(labels=heldout_labels()[:3], seeds=3, steps=2, batch_size=4)
    for sampled in (False, True):
        done: dict[str, int] = {}
        xs = None if not sampled else sample(teacher, task, settings)[0]
        adh = None if xs is None else {**task.adherence(xs, [lab for lab in settings.labels for _ in range(3)])}
        m, _, _ = evaluate(teacher, _student(teacher, [0]), task, settings,
                           teacher_samples=None if xs is None else (xs, adh),
                           progress=lambda phase, n: done.__setitem__(phase, done.get(phase, 0) + n))
        assert done == eval_work(settings, teacher_sampled=sampled)
        assert m["psnr_db_ci95"][0] <= m["psnr_db"] <= m["psnr_db_ci95"][1]
        assert done["student samples"] == 9 and ("teacher samples" in done) is not sampled


@pytest.fixture(scope="module")
def folders(tmp_path_factory, teacher):
    root = tmp_path_factory.mktemp("eval")
    save_tiny_wan(teacher, root / "teacher")
    TINY_TASK.save(root / "teacher" / "task.json")
    save_converted(_student(teacher, []), root / "same", metadata={})
    save_converted(_student(teacher, [0, 1]), root / "converted", metadata={})
    other = make_tiny_wan(seed=2, num_layers=3)
    save_converted(_student(other, [0]), root / "other_arch", metadata={})
    save_tiny_wan(teacher, root / "plain")
    (root / "prompts.txt").write_text("# held-out\na red disc moving up\n\na green square moving left\n")
    return root


def _eval(folders, student, out, *extra):
    return runner.invoke(app, ["eval", str(folders / "teacher"), str(folders / student), "--out", str(out),
                               "--prompts", str(folders / "prompts.txt"), "--seeds", "1", "--steps", "3", *extra])


def test_cli_eval_writes_metrics_gif_and_png(folders, tmp_path):
    res = _eval(folders, "same", tmp_path / "same")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "same" / "metrics.json").read_text())
    assert m["psnr_db"] == math.inf and m["pred_rel_error_mean"] == 0.0 and m["shared_weights_equal"]
    assert m["prompts"] == ["a red disc moving up", "a green square moving left"] and m["samples"] == 2
    res = _eval(folders, "converted", tmp_path / "conv")
    assert res.exit_code == 0, res.output
    m2 = json.loads((tmp_path / "conv" / "metrics.json").read_text())
    assert m2["psnr_db"] < 200 and m2["pred_rel_error_mean"] > 0 and m2["converted_layers"] == [0, 1]
    from PIL import Image

    gif = Image.open(tmp_path / "conv" / "samples.gif")
    assert gif.n_frames == 3  # one per latent frame
    assert m2["task"].endswith("task.json")
    assert (tmp_path / "conv" / "frames.png").stat().st_size > 1000


@pytest.mark.parametrize("case", ["other_arch", "not_converted", "prompts_missing", "prompt_word", "teacher_missing",
                                  "pyramidflow_option"])
def test_cli_eval_bad_input_is_one_clear_message(case, folders, tmp_path):
    out = tmp_path / "out"
    student, extra = "converted", []
    expect = {"other_arch": "different architectures", "not_converted": "not a converted model",
              "prompts_missing": "no such file", "prompt_word": "unknown word 'pink'",
              "teacher_missing": "does not exist", "pyramidflow_option": "--calib: PyramidFlow eval options"}[case]
    if case == "pyramidflow_option":
        extra = ["--calib", str(tmp_path)]
    if case == "other_arch":
        student = "other_arch"
    elif case == "not_converted":
        student = "plain"
    elif case == "prompts_missing":
        extra = ["--prompts", str(tmp_path / "nope.txt")]
    elif case == "prompt_word":
        bad = tmp_path / "bad.txt"
        bad.write_text("a pink square moving left\n")
        extra = ["--prompts", str(bad)]
    if case == "teacher_missing":
        res = runner.invoke(app, ["eval", str(tmp_path / "nope"), str(folders / student), "--out", str(out)])
    else:
        res = _eval(folders, student, out, *extra)
    assert res.exit_code != 0
    text = " ".join(res.output.split())
    assert "Traceback" not in res.output and "error:" in text and expect in text
    assert not out.exists()


def test_read_prompts_errors(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# nothing\n\n")
    with pytest.raises(M4VError, match="no prompts"):
        read_prompts(p)
    p.write_text("a red square\n")
    with pytest.raises(M4VError, match="no direction"):
        read_prompts(p)


# ------------------------------------------------------------------ ablate


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    import yaml

    from m4v_convert.recipes import RECIPES_DIR

    data = yaml.safe_load((RECIPES_DIR / "wan2.1.yaml").read_text())
    data["published"] = {k: str(RECIPES_DIR / v) for k, v in data["published"].items()}
    data["mmdim"].update(temporal_dim=8, temporal_heads=2)
    data["distill"]["grad_checkpointing"] = False  # a third faster; checkpointing: test_distill, test_memory_plan
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_ablate_switches_each_component_off(folders, tiny_recipe, tmp_path):
    out = tmp_path / "abl"
    res = runner.invoke(app, ["ablate", str(folders / "teacher"), "--out", str(out), "--recipe", str(tiny_recipe),
                              "--distill-steps", "1", "--stage2-steps", "1", "--layers", "all", "--seeds", "1",
                              "--steps", "2", "--threads", "1",
                              "--prompts", str(folders / "prompts.txt")])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "ablation.json").read_text())
    switched = {"full": None, "no-text-sandwich": "text_sandwich", "no-registers": "registers", "raster": "zigzag",
                "no-temporal": "temporal", "forward-only": "bidirectional"}
    assert list(report["variants"]) == list(switched)
    for name, fld in switched.items():
        cfg = json.loads((out / "variants" / name / "config.json").read_text())
        layers = cfg["m4v"]["layers"]
        assert set(layers) == {"0", "1"}
        for layer in layers.values():
            for f in ("text_sandwich", "registers", "zigzag", "temporal", "bidirectional"):
                assert layer[f] is (f != fld), (name, f)
        distill = report["variants"][name]["distill"]  # equal budget
        assert distill["stage1_steps"] == 1 and distill["schedules"]["stage2"]["steps"] == 1
    table = (out / "ablation.md").read_text()
    assert "w/o text sandwich" in table and "PSNR" in table and "teacher (attention)" in table
    # every variant against the full block on the same samples; the point is the PSNR difference
    full = report["variants"]["full"]
    assert "vs_full" not in full
    for name in list(switched)[1:]:
        v = report["variants"][name]
        if math.isfinite(v["psnr_db"]) and math.isfinite(full["psnr_db"]):
            assert v["vs_full"]["psnr_delta_db"] == pytest.approx(v["psnr_db"] - full["psnr_db"], abs=1e-9)
        assert json.loads((out / "variants" / name / "metrics.json").read_text())["vs_full"] == v["vs_full"]
    assert table.count("PSNR vs all components") == len(switched) - 1
    assert "w/o temporal branch" in res.output


def test_cli_ablate_continues_an_interrupted_run_with_the_same_numbers(folders, tiny_recipe, tmp_path, monkeypatch):
    from pathlib import Path

    from safetensors.torch import load_file

    import m4v_convert.jobs.eval as ev
    import m4v_convert.jobs.convert as pl

    def run(out, *extra):
        return runner.invoke(app, ["ablate", str(folders / "teacher"), "--out", str(out), "--recipe", str(tiny_recipe),
                                   "--variants", "full,no-registers,raster", "--distill-steps", "2", "--stage2-steps",
                                   "1", "--layers", "all", "--seeds", "1", "--steps", "2", "--threads", "1",
                                   "--prompts", str(folders / "prompts.txt"), *extra])

    res = run(tmp_path / "ref")  # uninterrupted
    assert res.exit_code == 0, res.output
    ref = json.loads((tmp_path / "ref" / "ablation.json").read_text())
    assert ref["resumed_variants"] == [] and not (tmp_path / "ref.work").exists()

    converted, sampled = [], []
    real_convert, real_sample = pl.convert, ev.sample

    def convert(plan):
        converted.append(Path(plan.flags.out).name)
        if len(converted) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third variant
        return real_convert(plan)

    def sample(model, *a, **k):
        sampled.append(type(model).__name__)
        return real_sample(model, *a, **k)

    monkeypatch.setattr(pl, "convert", convert)
    monkeypatch.setattr(ev, "sample", sample)
    out, work = tmp_path / "abl", tmp_path / "abl.work"
    res = run(out)
    assert res.exit_code == 130 and not out.exists()
    assert sorted(d.name for d in (work / "variants").iterdir()) == ["full", "no-registers"]
    assert "the same command continues" in " ".join(res.output.split())

    res = run(out, "--seed", "1")  # other settings: refused, the finished variants stay
    assert res.exit_code != 0 and "other settings (seed)" in " ".join(res.output.split()) and (work / "variants" / "full").exists()

    converted.clear(), sampled.clear()
    res = run(out)
    assert res.exit_code == 0, res.output
    assert converted == ["raster"]  # only the unfinished variant is converted
    assert sampled == ["M4VWanTransformer3DModel"]  # the teacher's samples came from the work folder
    assert not work.exists()
    got = json.loads((out / "ablation.json").read_text())
    assert got["resumed_variants"] == ["full", "no-registers"]
    for name, m in ref["variants"].items():  # the same numbers as the run that was never interrupted
        for key in ("psnr_db_per_sample", "pred_rel_error", "read_teacher", "read_student", "ssim", "vs_full"):
            assert got["variants"][name].get(key) == m.get(key), (name, key)
        a, b = (load_file(str(f / "variants" / name / "diffusion_pytorch_model.safetensors")) for f in (out, tmp_path / "ref"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def two_seed_ablation(folders, tiny_recipe, tmp_path_factory):
    """``ablate(out, *flags)``, and two runs of it: full and no-registers at distillation seeds 0 and 1
    (``whole``), no-registers at seed 1 alone (``single``)."""
    def ablate(out, *extra):
        return runner.invoke(app, ["ablate", str(folders / "teacher"), "--out", str(out), "--recipe", str(tiny_recipe),
                                   "--distill-steps", "2", "--stage2-steps", "1", "--layers", "all", "--seeds", "1",
                                   "--steps", "2", "--threads", "1", "--prompts", str(folders / "prompts.txt"), *extra])

    root = tmp_path_factory.mktemp("ablate")
    res = ablate(root / "whole", "--variants", "full,no-registers", "--distill-seeds", "0,1")
    assert res.exit_code == 0, res.output
    res = ablate(root / "single", "--variants", "no-registers", "--distill-seeds", "1")
    assert res.exit_code == 0, res.output
    return ablate, root / "whole", root / "single"


def test_cli_ablate_distils_each_variant_at_every_seed_and_pairs_within_a_seed(two_seed_ablation, tmp_path):
    from safetensors.torch import load_file

    from m4v_convert.metrics import paired_psnr_delta

    ablate, out, single = two_seed_ablation
    report = json.loads((out / "ablation.json").read_text())
    units = ["full-seed0", "no-registers-seed0", "full-seed1", "no-registers-seed1"]
    assert list(report["variants"]) == units and report["distill_seeds"] == [0, 1]
    weights = {u: load_file(str(out / "variants" / u / "diffusion_pytorch_model.safetensors")) for u in units}
    assert any(not torch.equal(weights["full-seed0"][k], weights["full-seed1"][k]) for k in weights["full-seed0"])
    # oracle: a unit is the ablation of that one distillation seed alone, bit for bit (the calibration
    # latents the task generates follow --seed, 0 in both runs)
    alone = load_file(str(single / "variants" / "no-registers" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(alone[k], weights["no-registers-seed1"][k]) for k in alone)
    v = report["variants"]
    for seed in (0, 1):  # each variant against the full conversion of its own seed
        assert v[f"no-registers-seed{seed}"]["vs_full"] == paired_psnr_delta(v[f"full-seed{seed}"],
                                                                             v[f"no-registers-seed{seed}"])
    row = report["across_seeds"]["no-registers"]
    assert row["psnr_db"] == [v["no-registers-seed0"]["psnr_db"], v["no-registers-seed1"]["psnr_db"]]
    deltas = [v[f"no-registers-seed{s}"]["vs_full"]["psnr_delta_db"] for s in (0, 1)]
    assert row["vs_full_psnr_delta_db"] == deltas
    assert row["vs_full_psnr_delta_db_mean"] == pytest.approx(sum(deltas) / 2)
    cis = row["vs_full_psnr_delta_db_ci95"]
    assert row["vs_full_consistent"] == (all(hi < 0 for _, hi in cis) or all(lo > 0 for lo, _ in cis))
    assert "vs_full_psnr_delta_db" not in report["across_seeds"]["full"]
    table = (out / "ablation.md").read_text()
    assert "## Across distillation seeds" in table and "w/o per-frame registers" in table
    res = ablate(tmp_path / "bad", "--distill-seeds", "1,1")
    assert res.exit_code != 0 and "distinct seeds" in " ".join(res.output.split())
    res = ablate(tmp_path / "bad", "--distill-seeds", "one")
    assert res.exit_code != 0 and "comma-separated integers" in " ".join(res.output.split())



def test_ablate_merge_gives_the_report_of_one_run_of_the_whole_grid(two_seed_ablation, tmp_path):
    """Oracle: parts that split the grid (full at seeds 0 and 1; no-registers at seed 0; no-registers at
    seed 1 alone, paired with another part's full) merge into the report one run of the grid writes."""
    import os

    ablate, whole, single = two_seed_ablation
    fulls, reg0 = tmp_path / "fulls", tmp_path / "reg0"
    assert ablate(fulls, "--variants", "full", "--distill-seeds", "0,1").exit_code == 0
    assert ablate(reg0, "--variants", "no-registers", "--distill-seeds", "0").exit_code == 0
    parts = (fulls, reg0, single)
    before = {f: f.read_bytes() for p in parts for f in p.rglob("*") if f.is_file()}
    out = tmp_path / "merged"
    res = runner.invoke(app, ["ablate-merge", *map(str, parts), "--out", str(out)])
    assert res.exit_code == 0, res.output
    got, want = (json.loads((d / "ablation.json").read_text()) for d in (out, whole))
    assert list(got["variants"]) == list(want["variants"]) and got["distill_seeds"] == [0, 1]
    run_only = {"seconds", "convert_seconds", "distill"}  # wall times, and the conversion's log
    for unit, m in want["variants"].items():
        assert {k: v for k, v in got["variants"][unit].items() if k not in run_only} == {
            k: v for k, v in m.items() if k not in run_only}, unit
        assert json.loads((out / "variants" / unit / "metrics.json").read_text()) == got["variants"][unit]
    assert got["across_seeds"] == want["across_seeds"]
    assert (out / "ablation.md").read_text() == (whole / "ablation.md").read_text()
    # the parts are read, never written: the model files are linked, the merged reports new files
    assert {f: f.read_bytes() for p in parts for f in p.rglob("*") if f.is_file()} == before
    model, source = out / "variants" / "no-registers-seed1" / "diffusion_pytorch_model.safetensors", \
        single / "variants" / "no-registers" / "diffusion_pytorch_model.safetensors"
    assert os.path.samefile(model, source)
    assert not os.path.samefile(out / "variants" / "no-registers-seed1" / "metrics.json",
                                single / "variants" / "no-registers" / "metrics.json")

    def merge(*args):
        res = runner.invoke(app, ["ablate-merge", *map(str, args)])
        assert res.exit_code != 0 and "Traceback" not in res.output
        assert len([line for line in res.output.splitlines() if line.startswith("error:")]) == 1, res.output
        return " ".join(res.output.split())

    assert "is in both" in merge(fulls, whole, "--out", tmp_path / "o")
    assert "missing no-registers at seed 0" in merge(fulls, single, "--out", tmp_path / "o")
    assert "give two or more" in merge(fulls, "--out", tmp_path / "o")
    assert "no ablation.json" in merge(fulls, tmp_path, "--out", tmp_path / "o")
    assert "would overwrite that input" in merge(fulls, reg0, single, "--out", fulls / "x")
    # the task file as a run spelled it (relative to where it ran) is the same task
    import shutil

    relative = tmp_path / "relative"
    shutil.copytree(reg0, relative)
    report = json.loads((relative / "ablation.json").read_text())
    report["task"] = os.path.relpath(report["task"])
    (relative / "ablation.json").write_text(json.dumps(report))
    res = runner.invoke(app, ["ablate-merge", str(fulls), str(relative), str(single), "--out", str(tmp_path / "rel")])
    assert res.exit_code == 0, res.output
    other = tmp_path / "other"  # another budget: not a part of this ablation
    assert ablate(other, "--variants", "no-registers", "--distill-seeds", "0", "--distill-steps", "1").exit_code == 0
    assert "their distill_steps differ" in merge(fulls, other, single, "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()

def test_cli_ablate_bad_variant(folders, tmp_path):
    res = runner.invoke(app, ["ablate", str(folders / "teacher"), "--out", str(tmp_path / "o"), "--variants", "nope"])
    assert res.exit_code != 0 and "unknown 'nope'" in res.output and not (tmp_path / "o").exists()


def test_ablate_switches_off_each_component_the_recipe_has_on():
    import inspect

    import cli
    from m4v_convert.jobs.ablate import COMPONENTS, VARIANTS, AblateOptions, default_variants
    from m4v_convert.recipes import load_recipe

    assert inspect.signature(cli.ablate).parameters["variants"].default.default is None
    assert AblateOptions(teacher=Path("t"), out=Path("o")).variants is None  # the recipe decides
    wan = load_recipe("wan2.1").mmdim_settings
    assert wan["scan"] == "space" and wan["bidirectional"] is True and wan["text_projections"] is False
    # the shipped recipe scans space-major: every component but the scan order (nothing to switch off)
    assert default_variants(wan) == ["full", "no-text-sandwich", "no-registers", "raster", "no-temporal",
                                     "forward-only"]
    assert default_variants({**wan, "scan": "alternate", "temporal": False}) == [
        "full", "no-text-sandwich", "no-registers", "raster", "forward-only", "space-scan"]
    # each component variant changes exactly the field it names, to a value the recipe has not
    for name in COMPONENTS:
        (key, value), = VARIANTS[name][0].items()
        assert key in wan and value != {**wan, "scan": "time"}[key]
    assert VARIANTS["time-scan"][0] == {"scan": "time"} and VARIANTS["alternate-scan"][0] == {"scan": "alternate"}


def test_cli_ablate_refuses_a_variant_the_recipe_already_is(folders, tmp_path):
    import yaml

    rec = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "wan2.1.yaml").read_text())
    rec["mmdim"]["temporal"] = False
    rec["published"] = {}
    (tmp_path / "no-temporal.yaml").write_text(yaml.safe_dump(rec))
    for args, said in [(["--variants", "full,space-scan"], "--variants space-scan: recipe wan2.1 already has "
                         "mmdim.scan: \"space\""),
                       (["--recipe", str(tmp_path / "no-temporal.yaml"), "--variants", "full,no-temporal"],
                        "--variants no-temporal: recipe wan2.1 already has mmdim.temporal: false"),
                       (["--variants", "full,raster,full"], "--variants: 'full' given twice")]:
        res = runner.invoke(app, ["ablate", str(folders / "teacher"), "--out", str(tmp_path / "o"), *args])
        assert res.exit_code != 0 and said in " ".join(res.output.split()), res.output
        assert not (tmp_path / "o").exists() and not (tmp_path / "o.work").exists()


@pytest.fixture(scope="module")
def train_teacher():
    """scripts/train_teacher.py as a module (a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("train_teacher", Path(__file__).parents[1] / "scripts" / "train_teacher.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_teacher_temporal_influence_probe_tells_tracking_from_pooling(train_teacher):
    mod = train_teacher
    class Shift(torch.nn.Module):  # each frame predicts from the previous one: a one-frame track
        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
            return (torch.cat([hidden_states[:, :, :1], hidden_states[:, :, :-1]], 2),)

    class Pool(torch.nn.Module):  # every frame sees the mean over time: global pooling only
        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
            return (hidden_states + hidden_states.mean(2, keepdim=True),)

    task = ShapesTask(TaskConfig())
    shift = mod.temporal_influence(Shift(), task, timesteps=(500,))["500"]
    assert shift[0] > 1 and shift[1] > 1 and max(shift[2:]) == 0
    pool = mod.temporal_influence(Pool(), task, timesteps=(500,))["500"]
    assert min(pool[1:]) > 0.1 and max(pool[1:]) - min(pool[1:]) < 0.02
    table = mod.influence_table({"temporal_influence": {"500": pool}})
    assert "| 500 | " in table and all(f"| frame {f} |" in table for f in range(task.config.frames))


def test_teacher_frame_awareness_probe_against_blind_and_frame_aware_oracles(train_teacher):
    mod = train_teacher
    class Blind(torch.nn.Module):  # a per-token function of the input: cannot tell identical frames apart
        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
            return (0.5 * hidden_states,)

    class Clock(torch.nn.Module):  # predicts x̂_0 = f (the frame index) everywhere
        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
            f = torch.arange(hidden_states.shape[2], dtype=hidden_states.dtype).view(1, 1, -1, 1, 1)
            return (hidden_states - f,)

    class Fold(torch.nn.Module):  # x̂_0 = 1 + |f − 2|: knows how far from the middle, not on which side
        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
            f = torch.arange(hidden_states.shape[2], dtype=hidden_states.dtype).view(1, 1, -1, 1, 1)
            return (hidden_states - 1 - (f - 2).abs(),)

    task = ShapesTask(TaskConfig())
    blind = mod.frame_awareness(Blind(), task, data_samples=4)
    assert blind["model"] == [0.0] * 5 and blind["model_mirror"] == [0.0] * 5
    # x̂_0 = f: distance |f − 2| from the middle frame, |2f − 4| from the mirror frame, over the middle's RMS 2
    clock = mod.frame_awareness(Clock(), task, data_samples=4)
    assert clock["model"] == pytest.approx([1.0, 0.5, 0.0, 0.5, 1.0])
    assert clock["model_mirror"] == pytest.approx([2.0, 1.0, 0.0, 1.0, 2.0])
    fold = mod.frame_awareness(Fold(), task, data_samples=4)
    assert fold["model"] == pytest.approx([2.0, 1.0, 0.0, 1.0, 2.0]) and fold["model_mirror"] == [0.0] * 5
    # the data reference: a moving object spreads the frame means, a still one (speed 0) does not
    moving = mod.frame_awareness(Blind(), task, data_samples=16)["data"]
    assert min(moving[:2] + moving[3:]) > 0.3 and moving[2] == 0.0
    still = mod.frame_awareness(Blind(), ShapesTask(TaskConfig(speed=0)), data_samples=16)["data"]
    assert max(still) < 1e-6
    # the data's mirror frames differ too: the track runs one way
    assert min(mod.frame_awareness(Blind(), task, data_samples=16)["data_mirror"][:2]) > 0.3
    table = mod.awareness_table({"frame_awareness": {**blind, "data": moving}})
    rows = [line for line in table.splitlines() if line.startswith("|")]
    # header, rule, 4 rows, each with 5 frame columns + the label (7 cell borders: the | in E[x₀ | ...] is escaped)
    assert len(rows) == 6 and all(line.replace("\\|", "").count("|") == 7 for line in rows)


def _with_and_without(lab: Labels, seed: int, **option):
    """One clip of ``lab`` drawn with the same seed by the default task and by one with ``option``:
    (default clip, optioned clip, optioned task)."""
    task = ShapesTask(TaskConfig(**option))
    return (ShapesTask(TaskConfig()).video(lab, torch.Generator().manual_seed(seed)),
            task.video(lab, torch.Generator().manual_seed(seed)), task)


def test_frame_code_adds_a_per_frame_ramp_orthogonal_to_the_colours():
    lab = Labels("purple", "disc", "down")
    plain, coded, task = _with_and_without(lab, 5, frame_code=0.3)
    diff = coded - plain  # the same draws: only the code differs, the same at every pixel of a frame
    torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff))
    per_frame = diff[:, :, 0, 0]  # (C, F)
    v = task.frame_code_vector
    assert float(v.pow(2).mean().sqrt()) == pytest.approx(1.0, abs=1e-6)  # per-channel RMS 1
    expected = v[:, None] * torch.tensor([-0.3, -0.15, 0.0, 0.15, 0.3])[None]  # first frame −0.3 … last +0.3
    torch.testing.assert_close(per_frame, expected)
    assert (task.colour_vectors @ v).abs().max() < 1e-4  # orthogonal to every colour
    assert task.adherence(coded[None], [lab])["score"] == 100.0  # colour and motion still read back
    assert torch.equal(task.colour_vectors, ShapesTask(TaskConfig()).colour_vectors)


def test_position_code_is_a_fixed_ramp_per_axis_orthogonal_to_colours_and_frame_code():
    lab = Labels("cyan", "square", "left")
    plain, coded, task = _with_and_without(lab, 3, position_code=0.5, frame_code=0.2)
    c, u = task.config, task.position_code_basis
    torch.testing.assert_close(u.T @ u, torch.eye(2))
    assert (task.colour_vectors @ u).abs().max() < 1e-4 and (task.frame_code_vector @ u).abs().max() < 1e-4
    along = torch.einsum("ck,cfhw->kfhw", u, coded)  # the clip's part along the two directions
    scale = c.channels ** 0.5
    ramp = torch.linspace(-0.5, 0.5, c.height) * scale
    torch.testing.assert_close(along[0], ramp.view(1, -1, 1).expand(c.frames, -1, c.width))  # rows: y
    torch.testing.assert_close(along[1], ramp.view(1, 1, -1).expand(c.frames, c.height, -1))  # columns: x
    # off the two directions the clip is the frame-coded clip with the background's part along them removed
    rest = coded - torch.einsum("ck,kfhw->cfhw", u, along)
    framed = ShapesTask(TaskConfig(frame_code=0.2)).video(lab, torch.Generator().manual_seed(3))
    torch.testing.assert_close(rest, framed - torch.einsum("ck,dk,dfhw->cfhw", u, u, framed))
    assert (torch.einsum("ck,cfhw->kfhw", u, plain) - 0).abs().max() > 0.05  # the plain clip's bg had a part there
    assert task.adherence(coded[None], [lab])["score"] == 100.0  # read_back ignores the shading
    assert torch.equal(task.colour_vectors, ShapesTask(TaskConfig()).colour_vectors)


def test_lanes_put_each_direction_sign_on_its_own_side_of_the_cross_axis():
    task = ShapesTask(TaskConfig(lanes=True))
    c = task.config

    def centroid(lab):  # (y, x) of the object in the first and last frame
        x = task.video(lab, torch.Generator().manual_seed(1))
        colour = task.colour_vectors[task.colour_names.index(lab.colour)]
        out = []
        for f in (0, c.frames - 1):
            mask = ((x[:, f] - colour[:, None, None]).norm(dim=0) < 1e-4).float()
            ys, xs = torch.nonzero(mask, as_tuple=True)
            out.append((float(ys.float().mean()), float(xs.float().mean())))
        return out

    half = (c.size - 1) / 2
    (ly0, lx0), (ly1, lx1) = centroid(Labels("red", "square", "left"))
    (ry0, rx0), (ry1, rx1) = centroid(Labels("red", "square", "right"))
    assert ly0 == ly1 == half and ry0 == ry1 == c.height - c.size + half  # top lane vs bottom lane
    assert lx1 < lx0 and rx1 > rx0  # the motion itself is unchanged
    (uy0, ux0), _ = centroid(Labels("red", "square", "up"))
    (dy0, dx0), _ = centroid(Labels("red", "square", "down"))
    assert ux0 == half and dx0 == c.width - c.size + half
    plain = ShapesTask(TaskConfig())
    lab = Labels("red", "square", "left")
    assert task.adherence(task.video(lab, torch.Generator().manual_seed(0))[None], [lab])["score"] == 100.0
    assert not torch.equal(task.video(lab, torch.Generator().manual_seed(0)),
                           plain.video(lab, torch.Generator().manual_seed(0)))


def test_vae_time_stride_blurs_later_frames_and_keeps_frame_zero():
    # the same draws with and without the stride: frame 0 is the same instant, later frames average
    # the object over 4 instants since the previous latent frame (Wan2.1's causal VAE)
    lab = Labels("green", "square", "right")
    sharp, blur, blur_task = _with_and_without(lab, 3, vae_time_stride=4)
    c = blur_task.config
    assert torch.equal(sharp[:, 0], blur[:, 0]) and not torch.equal(sharp[:, 1:], blur[:, 1:])
    colour = blur_task.colour_vectors[blur_task.colour_names.index("green")]
    bg = blur[:, 0, 0, 0]
    # coverage of the colour at each pixel: x = bg + cover·(colour − bg)
    cover = torch.einsum("cfhw,c->fhw", blur - bg.view(-1, 1, 1, 1), colour - bg) / (colour - bg).pow(2).sum()
    assert cover.sum((1, 2)) == pytest.approx(torch.full((c.frames,), float(c.size ** 2)), abs=1e-4)  # mass kept
    xx = torch.arange(c.width, dtype=torch.float32)
    cx = (cover.sum(1) * xx).sum(-1) / cover.sum((1, 2))
    x0 = float(cx[0])  # the sharp frame's centroid; later ones sit at the mean of their instants
    expected = [x0] + [x0 + c.speed * (f - 1 + (1 + 2 + 3 + 4) / 16) for f in range(1, c.frames)]
    assert cx.tolist() == pytest.approx(expected, abs=1e-4)
    assert blur_task.adherence(blur[None], [lab])["score"] == 100.0
    with pytest.raises(M4VError, match="vae_time_stride"):
        ShapesTask(TaskConfig(vae_time_stride=0))


def test_trail_is_a_fading_copy_one_frame_behind_the_object():
    lab = Labels("blue", "square", "left")
    plain, trail, trail_task = _with_and_without(lab, 4, trail=0.4)
    c = trail_task.config
    colour = trail_task.colour_vectors[trail_task.colour_names.index("blue")]
    bg = plain[:, 0, 0, 0]
    assert torch.equal(plain[:, 0], trail[:, 0])  # nothing behind the object before it moves
    on = (plain - bg.view(-1, 1, 1, 1)).norm(dim=0) > 1e-6  # (F, H, W) where the object is
    for f in range(1, c.frames):
        streak = on[f - 1] & ~on[f]  # where it was and no longer is: on the side it comes from
        assert streak.sum() == c.size * c.speed
        assert int(streak.nonzero()[:, 1].min()) > int(on[f].nonzero()[:, 1].max())  # moving left: streak right
        torch.testing.assert_close(trail[:, f][:, streak], (0.6 * bg + 0.4 * colour)[:, None].expand(-1, int(streak.sum())))
        assert torch.equal(trail[:, f][:, ~streak], plain[:, f][:, ~streak])  # the object and the rest unchanged
    assert trail_task.adherence(trail[None], [lab])["score"] == 100.0


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()  # train_teacher.main sets its --threads for the process
    yield
    torch.set_num_threads(n)


def test_train_teacher_run_cut_by_time_is_reproduced_by_stop_step(train_teacher, tmp_path, keep_threads):
    from safetensors.torch import load_file

    fast = ["--steps", "6", "--warmup", "2", "--probe-every", "0", "--eval-seeds", "1", "--sample-steps", "1",
            "--calib-samples", "2", "--log-every", "1"]
    train_teacher.main(["--out", str(tmp_path / "cut"), *fast, "--max-minutes", "0"])  # cut after step 1
    cut = json.loads((tmp_path / "cut" / "training.json").read_text())
    assert cut["stopped"] == "max-minutes" and cut["steps"] == 1 and cut["schedule_steps"] == 6
    card = (tmp_path / "cut" / "README.md").read_text()
    assert "`--stop-step 1` reproduces it" in card and "over a 6-step schedule" in card
    train_teacher.main(["--out", str(tmp_path / "again"), *fast, "--stop-step", "1"])
    again = json.loads((tmp_path / "again" / "training.json").read_text())
    assert again["stopped"] == "stop-step" and again["steps"] == 1
    a = load_file(str(tmp_path / "cut" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "again" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the cut run is not simply the full one: two steps of the same schedule give other weights
    train_teacher.main(["--out", str(tmp_path / "two"), *fast, "--stop-step", "2"])
    c = load_file(str(tmp_path / "two" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_clean_frame_pretext_marks_one_frame_and_leaves_it_out_of_the_loss(train_teacher):
    mod = train_teacher
    clean = mod.clean_frames(64, 5, 1.0, torch.Generator().manual_seed(0))
    assert clean.sum(1).eq(1).all() and clean.any(0).all()  # one frame each, every frame drawn
    assert not mod.clean_frames(64, 5, 0.0, torch.Generator().manual_seed(0)).any()
    half = mod.clean_frames(4000, 5, 0.5, torch.Generator().manual_seed(1)).any(1).float().mean()
    assert abs(half - 0.5) < 0.03
    g = torch.Generator().manual_seed(2)
    target, pred = torch.randn(3, 2, 5, 4, 4, generator=g), torch.randn(3, 2, 5, 4, 4, generator=g)
    clean = torch.zeros(3, 5, dtype=torch.bool)
    clean[0, 1] = clean[2, 4] = True
    keep = [(b, f) for b in range(3) for f in range(5) if not clean[b, f]]
    by_hand = torch.stack([(pred[b, :, f] - target[b, :, f]).pow(2).mean() for b, f in keep]).mean()
    torch.testing.assert_close(mod.flow_loss(pred, target, clean), by_hand)
    wrong_where_clean = target.clone()
    wrong_where_clean[0, :, 1] += 5.0
    wrong_where_clean[2, :, 4] -= 5.0
    assert mod.flow_loss(wrong_where_clean, target, clean) == 0
    torch.testing.assert_close(mod.flow_loss(pred, target), (pred - target).pow(2).mean())


class _FrameWise(torch.nn.Module):
    """A 'model' that treats each frame alone (the same map on every frame): time-reversal equivariant."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        b, c, f, h, w = hidden_states.shape
        y = self.conv(hidden_states.transpose(1, 2).reshape(b * f, c, h, w)).view(b, f, c, h, w).transpose(1, 2)
        return (y,)


class _Forwards(_FrameWise):
    """Predicts each frame from the one before it (frame 0 from itself): knows which way time runs."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        prev = torch.cat([hidden_states[:, :, :1], hidden_states[:, :, :-1]], dim=2)
        return super().forward(prev, timestep, encoder_hidden_states)


class _TextReader(_FrameWise):
    """Adds a function of the prompt to every frame: reads the text, blind to time."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        y = super().forward(hidden_states, timestep, encoder_hidden_states)[0]
        return (y + encoder_hidden_states.sum(1)[:, :16, None, None, None],)


def test_time_reversal_probe_tells_an_equivariant_model_from_a_time_ordered_one(train_teacher):
    from m4v_convert.synthetic import ShapesTask, TaskConfig

    task = ShapesTask(TaskConfig())
    torch.manual_seed(0)
    blind = train_teacher.time_reversal(_FrameWise(), task, samples=8)
    for row in blind.values():  # the same map per frame, text unread: neither mismatch costs anything
        assert row["forward"] == pytest.approx(row["reversed"], rel=1e-5) and abs(row["reversed_excess_pct"]) < 1e-3
        assert row["opposite_prompt"] == row["forward"] and row["opposite_prompt_excess_pct"] == 0
    torch.manual_seed(0)
    ordered = train_teacher.time_reversal(_Forwards(), task, samples=8)
    assert all(abs(row["forward"] - row["reversed"]) > 1e-4 for row in ordered.values())
    for row in ordered.values():
        assert row["reversed_excess_pct"] == pytest.approx(100 * (row["reversed"] / row["forward"] - 1), abs=0.02)
    torch.manual_seed(0)
    reader = train_teacher.time_reversal(_TextReader(), task, samples=8)
    assert all(row["opposite_prompt"] != row["forward"] for row in reader.values())


class _WordReader(_FrameWise):
    """Adds a function of one prompt word (row ``word`` of "a {colour} {shape} moving {direction}")."""

    def __init__(self, word: int):
        super().__init__()
        self.word = word

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        y = super().forward(hidden_states, timestep, encoder_hidden_states)[0]
        return (y + encoder_hidden_states[:, self.word, :16, None, None, None],)


def test_word_influence_probe_names_the_words_a_model_reads(train_teacher):
    from m4v_convert.synthetic import ShapesTask, TaskConfig

    task = ShapesTask(TaskConfig())
    torch.manual_seed(0)
    blind = train_teacher.word_influence(_FrameWise(), task, samples=8)
    assert blind == {"sign": 0.0, "axis": 0.0, "colour": 0.0}  # text unread
    torch.manual_seed(0)
    colour = train_teacher.word_influence(_WordReader(1), task, samples=8)
    assert colour["sign"] == 0.0 and colour["axis"] == 0.0 and colour["colour"] > 1.0
    torch.manual_seed(0)
    direction = train_teacher.word_influence(_WordReader(4), task, samples=8)
    assert direction["colour"] == 0.0 and direction["sign"] > 1.0 and direction["axis"] > 1.0


def test_teacher_card_names_the_checkpoint_and_what_differs_from_the_plain_task(train_teacher):
    import json
    from pathlib import Path

    root = Path(__file__).parents[1] / "checkpoints"
    plain = json.loads((root / "wan2.1-tiny-shapes" / "training.json").read_text())
    assert train_teacher.variant_note(plain) == ""
    card = train_teacher.card(plain, "wan2.1-tiny-shapes")
    assert card.startswith("# wan2.1-tiny-shapes\n") and "alternative to the default teacher\n`wan2.1-tiny-shapes-coded`" in card
    assert "the tries that led to it are below" in card and "Given both, it works" in card
    trail = json.loads((root / "wan2.1-tiny-shapes-trail" / "training.json").read_text())
    note = train_teacher.variant_note(trail)
    assert "`trail=0.4`" in note and "`--shift-init 3.0`" in note and "jitter" not in note
    trail_card = train_teacher.card(trail, "wan2.1-tiny-shapes-trail")
    assert trail_card.startswith("# wan2.1-tiny-shapes-trail\n") and "on `wan2.1-tiny-shapes`'s card" in trail_card
    assert "knows which way time runs" in trail_card  # its time_reversal shows the asymmetry
    coded = json.loads((root / "wan2.1-tiny-shapes-coded" / "training.json").read_text())
    assert train_teacher.variant_note(coded) == (
        "\n- differs from the plain task and training (`wan2.1-tiny-shapes`): `frame_code=2.0`, `position_code=2.0` "
        "(see `synthetic.TaskConfig`, `--help`)")
    coded_card = train_teacher.card(coded)  # the default name
    assert coded_card.startswith("# wan2.1-tiny-shapes-coded\n") and "default checkpoint the README's run" in coded_card
    assert "trained with `frame_code=2.0` and `position_code=2.0`" in coded_card and "reads the direction word" in coded_card
    assert train_teacher.codes_note(plain) == train_teacher.codes_note(trail) == ""  # codes off: no such paragraph
    for name, text in (("wan2.1-tiny-shapes", card), ("wan2.1-tiny-shapes-trail", trail_card),
                       ("wan2.1-tiny-shapes-coded", coded_card)):
        assert (root / name / "README.md").read_text() == text, name  # the shipped cards are current


def test_shipped_coded_teacher_follows_the_prompts_direction_and_its_card_numbers_come_from_its_weights(train_teacher, keep_threads):
    """The frame- and position-coded teacher reads the direction word (the plain-task teacher does not), and
    its recorded probes are what its shipped weights give."""
    import json
    from pathlib import Path

    from diffusers import WanTransformer3DModel

    from m4v_convert.synthetic import TaskConfig, heldout_labels

    torch.set_num_threads(1)
    records, influence = {}, {}
    for name in ("wan2.1-tiny-shapes-coded", "wan2.1-tiny-shapes"):
        folder = Path(__file__).parents[1] / "checkpoints" / name
        model = WanTransformer3DModel.from_pretrained(folder).eval()
        task = ShapesTask(TaskConfig.load(folder / "task.json"))
        records[name] = json.loads((folder / "training.json").read_text())
        influence[name] = train_teacher.word_influence(model, task)
        if name == "wan2.1-tiny-shapes-coded":  # its own samples, one seed per held-out prompt, 10 steps
            quality = train_teacher.sample_quality(model, task, heldout_labels(), 1, steps=10, shift=3.0)
            assert quality["colour_acc"] == 100.0 and quality["direction_acc"] >= 87.5, quality
    for name, got in influence.items():
        assert got == pytest.approx(records[name]["word_influence"], abs=0.05), name
    assert influence["wan2.1-tiny-shapes-coded"]["sign"] > 10 > 1 > influence["wan2.1-tiny-shapes"]["sign"]
