"""--layers auto --flops-budget F: sensitivity probe, greedy choice within the budget, and its bad input."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from m4v_convert.backbones.wan.flops import mmdim_config_fn_from, wan_config, wan_model_flops
from m4v_convert.backbones.wan.testing import make_tiny_wan, save_tiny_wan, save_tiny_wan_recipe
from m4v_convert.jobs.layer_selection import choose

runner = CliRunner()
SIZE = ["--size", "480x832", "--frames", "81"]  # MM-DiM is cheaper than attention here, even in a tiny model


def test_choose_keeps_the_most_sensitive_layers_that_fit():
    """Hand oracle: attention layers cost 10, MM-DiM layers 1, the rest of the model 20."""
    cost = {0: 10, 1: 10, 2: 30, 3: 10}  # layer 2's attention is three times as dear

    def ratio(converted):
        total = 20 + sum(1 if i in converted else cost[i] for i in cost)
        return total / (20 + sum(cost.values()))

    sens = {0: 0.5, 1: 0.9, 2: 0.95, 3: 0.1}
    # all converted: 24/80 = 0.3; budget 0.45 = 36/80: layer 2 (most sensitive) would add 29 → 53, too much;
    # layer 1 adds 9 → 33, fits; layer 0 would add 9 → 42, too much; layer 3 neither
    assert choose(sens, ratio, 36 / 80) == [0, 2, 3]
    assert choose(sens, ratio, 53 / 80) == [0, 1, 3]  # now layer 2 fits, and nothing after it
    assert choose(sens, ratio, 0.3) == [0, 1, 2, 3]  # only the floor: everything converted
    assert choose(sens, ratio, 0.99) == [3]  # all three others stay attention (71/80); all four would be 1.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt = save_tiny_wan(make_tiny_wan(seed=1, num_layers=4), tmp_path_factory.mktemp("ckpt") / "wan")
    recipe = save_tiny_wan_recipe(tmp_path_factory.mktemp("recipe") / "tiny.yaml")
    return ckpt, recipe, yaml.safe_load(recipe.read_text())


def _run(tiny, out, *flags):
    ckpt, recipe, _ = tiny
    return runner.invoke(app, ["wan2.1", "--checkpoint", str(ckpt), "--out", str(out), "--recipe", str(recipe),
                               *SIZE, "--distill-steps", "3", "--stage2-steps", "1", *flags])


def _ratio(tiny, layers):
    ckpt, _, data = tiny
    cfg = wan_config(json.loads((ckpt / "config.json").read_text()))
    r = wan_model_flops(cfg, 81, 480, 832, int(data["video"].get("text_len", 512)), layers,
                        mmdim_config_fn_from(cfg, data["mmdim"]))
    return r["converted_total_flops"] / r["original_total_flops"]


def test_auto_converts_what_the_probe_and_the_budget_choose(tiny, tmp_path):
    # the probe is a stage-1-only run of every layer: its errors are that run's, to the bit
    probe = tmp_path / "probe"
    res = _run(tiny, probe, "--layers", "all", "--stages", "1", "--distill-steps", "2")
    assert res.exit_code == 0, res.output
    sensitivity = {int(k): v for k, v in json.loads((probe / "conversion.json").read_text())["error_after"].items()}
    # a budget between one attention layer kept and two: exactly the most sensitive layer stays attention
    floor = _ratio(tiny, [0, 1, 2, 3])
    one_kept = max(_ratio(tiny, [j for j in range(4) if j != i]) for i in range(4))
    two_kept = min(_ratio(tiny, [j for j in range(4) if j not in (i, k)]) for i in range(4) for k in range(i))
    budget = (one_kept + two_kept) / 2
    out = tmp_path / "auto"
    res = _run(tiny, out, "--layers", "auto", "--flops-budget", f"{budget:.6f}", "--probe-steps", "2")
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "conversion.json").read_text())
    sel = summary["layer_selection"]
    assert {int(k): v for k, v in sel["sensitivity"].items()} == sensitivity
    worst = max(sensitivity, key=sensitivity.get)
    assert sel["kept_attention"] == [worst] and summary["layers"] == sel["converted"] == [
        i for i in range(4) if i != worst]
    assert sel["flops_ratio"] == pytest.approx(summary["converted_total_flops"] / summary["original_total_flops"])
    assert floor < sel["flops_ratio"] <= budget
    assert "Layer selection" in (out / "README.md").read_text() and f"| {worst} |" in (out / "README.md").read_text()
    # and the conversion itself is the one --layers with that list runs, weight for weight
    explicit = tmp_path / "explicit"
    res = _run(tiny, explicit, "--layers", ",".join(map(str, sel["converted"])))
    assert res.exit_code == 0, res.output
    a, b = load_file(str(out / "diffusion_pytorch_model.safetensors")), load_file(
        str(explicit / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags, message", [
    (["--flops-budget", "0.4"], "--flops-budget goes with --layers auto"),
    (["--layers", "0-1", "--probe-steps", "5"], "--probe-steps goes with --layers auto"),
    (["--layers", "auto"], "--layers auto needs --flops-budget F"),
    (["--layers", "auto", "--flops-budget", "1.5"], "--flops-budget: expected a fraction between 0 and 1"),
    (["--layers", "auto", "--flops-budget", "0.4", "--probe-steps", "0"], "--probe-steps: expected >= 1"),
    (["--layers", "auto", "--flops-budget", "0.4", "--num-processes", "2"],
     "--layers auto: not offered with several processes yet"),
    (["--layers", "auto", "--flops-budget", "0.001"], "--flops-budget 0.001: even with every layer converted"),
])
def test_auto_bad_input_is_one_line_before_any_weight_is_read(tiny, tmp_path, monkeypatch, flags, message):
    import m4v_convert.backbones.wan.load as load

    def no_weights(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(load, "load_wan_transformer", no_weights)
    out = tmp_path / "out"
    res = _run(tiny, out, *flags)
    assert res.exit_code != 0
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output and not out.exists()


def test_auto_is_refused_where_the_backbone_does_not_offer_it(tmp_path):
    res = runner.invoke(app, ["pyramidflow", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"),
                              "--layers", "auto", "--flops-budget", "0.4"])
    assert res.exit_code != 0 and "--flops-budget: not offered for pyramidflow recipes" in res.output


def _one_kept_budget(tiny):
    """A budget between one attention layer kept and two: exactly the most sensitive layer stays attention."""
    one_kept = max(_ratio(tiny, [j for j in range(4) if j != i]) for i in range(4))
    two_kept = min(_ratio(tiny, [j for j in range(4) if j not in (i, k)]) for i in range(4) for k in range(i))
    return f"{(one_kept + two_kept) / 2:.6f}"


def test_auto_resumes_with_its_own_selection_and_does_not_probe_again(tiny, tmp_path, monkeypatch,
                                                                        interrupt_stage2):
    import m4v_convert.backbones.wan.load as load
    import m4v_convert.jobs.layer_selection as layer_selection

    flags = ["--layers", "auto", "--flops-budget", _one_kept_budget(tiny), "--probe-steps", "2",
             "--stage2-steps", "3", "--checkpoint-every", "1"]
    ref = _run(tiny, tmp_path / "ref", *flags)  # uninterrupted
    assert ref.exit_code == 0, ref.output
    run = tmp_path / "run"
    interrupt_stage2(2)  # Ctrl-C in stage 2, after the probe and stage 1
    res = _run(tiny, tmp_path / "out", *flags, "--run-dir", str(run))
    assert res.exit_code != 0 and "--resume" in res.output and not (tmp_path / "out").exists()
    interrupt_stage2(None)

    def no_probe(*a, **k):
        raise AssertionError("the probe ran again")

    monkeypatch.setattr(layer_selection, "probe_sensitivity", no_probe)
    # another budget: refused before any weight is read, the run's checkpoint untouched
    real_load = load.load_wan_transformer
    monkeypatch.setattr(load, "load_wan_transformer", no_probe)
    before = (run / "state.pt").read_bytes()
    other = [*flags[:2], "--flops-budget", "0.99", *flags[4:]]
    res = _run(tiny, tmp_path / "out", *other, "--resume", str(run))
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    text = " ".join(res.output.split())
    assert "that run chose its layers with --flops-budget" in text and "this one asks for --flops-budget 0.99" in text
    assert (run / "state.pt").read_bytes() == before
    monkeypatch.setattr(load, "load_wan_transformer", real_load)
    res = _run(tiny, tmp_path / "out", *flags, "--resume", str(run))
    assert res.exit_code == 0, res.output
    assert "the resumed run's selection (its probe is not run again)" in " ".join(res.output.split())
    a, b = (json.loads((tmp_path / d / "conversion.json").read_text()) for d in ("ref", "out"))
    assert b["layer_selection"] == a["layer_selection"] and b["layers"] == a["layers"] == a["layer_selection"][
        "converted"]
    wa, wb = (load_file(str(tmp_path / d / "diffusion_pytorch_model.safetensors")) for d in ("ref", "out"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_auto_samples_the_teacher_once_into_the_runs_own_cache(tiny, tmp_path, monkeypatch):
    """The probe has no run folder of its own: with --run-dir elsewhere it must still sample into that run's
    cache (which the run then reuses), not a second time into a folder beside --out."""
    import m4v_convert.distill.teacher_samples as teacher_samples

    calls = []
    real = teacher_samples.sample_with_teacher

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(teacher_samples, "sample_with_teacher", counted)
    run, out = tmp_path / "elsewhere" / "run", tmp_path / "out"
    res = _run(tiny, out, "--layers", "auto", "--flops-budget", _one_kept_budget(tiny), "--probe-steps", "2",
               "--teacher-calib", "--run-dir", str(run))
    assert res.exit_code == 0, res.output
    assert len(calls) == 1, res.output
    assert (run / "teacher_calib").is_dir() and not (tmp_path / "out.train").exists()
    assert "reused" in res.output
