"""Bad input and faults, through the commands a user runs: one ``error:`` line, exit 2, no traceback,
and every input folder byte-identical afterwards."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli import app
from m4v_convert.backbones.wan.testing import make_tiny_wan, save_tiny_wan
from m4v_convert.recipes import RECIPES_DIR

runner = CliRunner()


def digest(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (relative name → sha256): the oracle for "unchanged"."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def world(tmp_path):
    """A tiny Wan checkpoint, a tiny recipe, calibration and data folders, a converted student:
    the inputs a user points the commands at."""
    from safetensors.torch import save_file
    import torch

    root = tmp_path / "inputs"
    ckpt = save_tiny_wan(make_tiny_wan(seed=0), root / "ckpt")
    data = yaml.safe_load((RECIPES_DIR / "wan2.1.yaml").read_text())
    data["published"] = {k: str(RECIPES_DIR / v) for k, v in data["published"].items()}
    data["mmdim"].update(temporal_dim=8, temporal_heads=2)
    data["calib"].update(latent_frames=2, latent_height=8, latent_width=8, text_len=6, num_samples=6, batch_size=2)
    (root / "recipes").mkdir()
    recipe = root / "recipes" / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(data))
    for name in ("calib", "data"):
        (root / name).mkdir()
        save_file({"latents": torch.randn(4, 4, 2, 8, 8), "text_embeds": torch.randn(4, 6, 32)},
                  str(root / name / "a.safetensors"))
    student = tmp_path / "student"
    res = runner.invoke(app, ["wan2.1", "--checkpoint", str(ckpt), "--out", str(student), "--recipe", str(recipe),
                              "--distill-steps", "1", "--stage2-steps", "0", "--size", "32x32", "--frames", "9"])
    assert res.exit_code == 0, res.output
    return {"root": root, "ckpt": ckpt, "recipe": recipe, "calib": root / "calib", "data": root / "data",
            "student": student}


def _refused(res, *expect: str) -> str:
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and res.output.count("error:") == 1, res.output
    for part in expect:
        assert part in text, text
    return text


@pytest.mark.parametrize("case", ["out_is_checkpoint", "out_inside_checkpoint", "out_contains_calib", "out_is_data",
                                  "out_is_recipe_folder", "out_is_run_dir"])
def test_convert_never_writes_over_an_input(case, world):
    """``--out`` that is, contains or lies inside an input is refused before anything is read or
    written, even with ``--overwrite`` (which would otherwise replace that input)."""
    before = digest(world["root"])
    out, extra, flag = {
        "out_is_checkpoint": (world["ckpt"], [], "--checkpoint"),
        "out_inside_checkpoint": (world["ckpt"] / "converted", [], "--checkpoint"),
        "out_contains_calib": (world["root"], ["--calib", str(world["calib"])], "--checkpoint"),
        "out_is_data": (world["data"], ["--stages", "1,3", "--data", str(world["data"])], "--data"),
        "out_is_recipe_folder": (world["recipe"].parent, [], "recipe"),
        "out_is_run_dir": (world["root"] / "run", ["--run-dir", str(world["root"] / "run")], "--run-dir"),
    }[case]
    res = runner.invoke(app, ["convert", str(world["recipe"]), "--checkpoint", str(world["ckpt"]), "--out", str(out),
                              "--overwrite", "--distill-steps", "1", *extra])
    how = {"out_inside_checkpoint": "lies inside", "out_contains_calib": "contains",
           "out_is_recipe_folder": "contains"}.get(case, "is")
    _refused(res, f"{how} the {flag}", "nothing was written")
    assert digest(world["root"]) == before
    assert not (world["ckpt"] / "converted").exists() and not (world["root"] / "run").exists()


@pytest.mark.parametrize("command", ["eval", "ablate"])
def test_eval_and_ablate_never_write_over_an_input(command, world):
    before, student = digest(world["root"]), digest(world["student"])
    if command == "eval":
        args = ["eval", str(world["ckpt"]), str(world["student"]), "--out", str(world["student"]), "--overwrite"]
        expect = "is the student"
    else:
        args = ["ablate", str(world["ckpt"]), "--out", str(world["ckpt"]), "--overwrite", "--recipe",
                str(world["recipe"]), "--variants", "full", "--distill-steps", "1"]
        expect = "is the teacher"
    _refused(runner.invoke(app, args), expect)
    assert digest(world["root"]) == before and digest(world["student"]) == student
    assert json.loads((world["student"] / "config.json").read_text())["m4v"]["layers"]


def test_overwrite_never_discards_a_runs_checkpoint(world, tmp_path):
    """``--overwrite`` (the README's main command uses it) replaces ``--out``; a run folder holding a
    checkpoint is refused with the way to continue it, and the checkpoint is kept byte for byte."""
    run = tmp_path / "run"
    common = ["convert", str(world["recipe"]), "--checkpoint", str(world["ckpt"]), "--stages", "1",
              "--distill-steps", "2", "--checkpoint-every", "1", "--run-dir", str(run), "--layers", "0"]
    res = runner.invoke(app, [*common, "--out", str(tmp_path / "first")])
    assert res.exit_code == 0, res.output
    before = digest(run)
    res = runner.invoke(app, [*common, "--out", str(tmp_path / "first"), "--overwrite"])
    _refused(res, "holds the checkpoint of an earlier run (stage1, step 2)", f"--resume {run}")
    assert digest(run) == before


@pytest.mark.parametrize("extra,expect", [
    (["--frames", "0"], "--frames: expected >= 1, got 0"),
    (["--size", "4x4"], "too small for patch"),
    (["--frames", "100001"], "rotary embedding covers 64 positions per axis"),
    (["--layers", "0-7"], "out of range"),
])
def test_convert_checks_the_report_size_and_layers_before_reading_a_weight(extra, expect, world, monkeypatch):
    """What the checkpoint's config alone can refuse is refused before any weight is read (it used
    to surface after the whole distillation, or as a traceback)."""
    import m4v_convert.backbones.wan.load as load

    def no_weights(*a, **k):
        raise AssertionError("weights were read before the flags were checked")

    monkeypatch.setattr(load, "load_wan_transformer", no_weights)
    res = runner.invoke(app, ["convert", str(world["recipe"]), "--checkpoint", str(world["ckpt"]), "--out",
                              str(world["root"].parent / "out"), "--distill-steps", "1", *extra])
    _refused(res, expect)
    assert not (world["root"].parent / "out").exists()


@pytest.mark.parametrize("size", ["4x4", "480x832"])
def test_flops_of_a_size_the_model_cannot_take_is_one_line(size):
    frames = "81" if size == "4x4" else "100001"
    _refused(runner.invoke(app, ["flops", "wan2.1", "--model", "1.3b", "--size", size, "--frames", frames]),
             f"--size {size} / --frames {frames}")


def _edited_recipe(world, tmp_path, **calib) -> str:
    data = yaml.safe_load(world["recipe"].read_text())
    data["calib"].update(calib)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("case,expect", [
    ("lr_nan", "--lr: expected > 0, got nan"),
    ("layers_empty", "--layers: empty"),
    ("layers_backwards", "the range '1-0' runs backwards; write '0-1'"),
    ("no_calib_samples", "calib.num_samples"),
    ("no_eval_batches", "calib.eval_batches"),
    ("too_few_samples", "calib.num_samples 2 leaves no training sample"),
])
def test_flags_and_recipes_that_used_to_pass_or_crash_are_refused_up_front(case, expect, world, tmp_path,
                                                                           monkeypatch):
    """Each was accepted (and trained nothing, or trained on NaN) or crashed with a traceback; now
    one line, before any weight is read."""
    import m4v_convert.backbones.wan.load as load

    monkeypatch.setattr(load, "load_wan_transformer", lambda *a, **k: pytest.fail("weights were read"))
    recipe, extra = str(world["recipe"]), {
        "lr_nan": ["--lr", "nan"], "layers_empty": ["--layers", ""], "layers_backwards": ["--layers", "1-0"],
    }.get(case, [])
    if case == "no_calib_samples":
        recipe = _edited_recipe(world, tmp_path, num_samples=0)
    elif case == "no_eval_batches":
        recipe = _edited_recipe(world, tmp_path, eval_batches=0)
    elif case == "too_few_samples":
        recipe = _edited_recipe(world, tmp_path, num_samples=2)
    res = runner.invoke(app, ["convert", recipe, "--checkpoint", str(world["ckpt"]), "--out", str(tmp_path / "out"),
                              "--distill-steps", "1", *extra])
    _refused(res, expect)
    assert not (tmp_path / "out").exists()


def test_flops_json_naming_a_folder_is_refused_before_the_report(tmp_path):
    _refused(runner.invoke(app, ["flops", "wan2.1", "--model", "1.3b", "--no-crosscheck", "--json", str(tmp_path)]),
             "a folder; give a file name")


def test_ablate_names_the_variants_it_knows(world, tmp_path):
    res = runner.invoke(app, ["ablate", str(world["ckpt"]), "--out", str(tmp_path / "abl"), "--variants", "nope"])
    _refused(res, "--variants: unknown 'nope' (choose from full, no-text-sandwich")


def test_an_interrupted_run_names_its_checkpoint_and_the_command_that_continues(world, tmp_path, interrupt_stage2):
    run = tmp_path / "run"
    interrupt_stage2(3)
    res = runner.invoke(app, ["convert", str(world["recipe"]), "--checkpoint", str(world["ckpt"]), "--out",
                              str(tmp_path / "out"), "--stages", "1,2", "--distill-steps", "1", "--stage2-steps", "5",
                              "--checkpoint-every", "1", "--run-dir", str(run)])
    assert res.exit_code == 130 and "Traceback" not in res.output and res.output.count("error:") == 1
    text = " ".join(res.output.split())
    assert "interrupted; --out was not written; the run's checkpoint (stage2, step 2)" in text
    assert f"--resume {run} continues it" in text and not (tmp_path / "out").exists()


def test_sigterm_takes_the_interrupt_way_out(world, tmp_path):
    """SIGTERM (a scheduler stopping the job) used to exit without a word; now: exit 143, one line
    naming the kept checkpoint, no half-written --out."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run, out = tmp_path / "run", tmp_path / "out"
    cmd = [sys.executable, "-c", "import sys, cli; sys.argv[0] = 'm4v-convert'; cli.main()", "convert",
           str(world["recipe"]), "--checkpoint", str(world["ckpt"]), "--out", str(out), "--stages", "1,2",
           "--distill-steps", "1", "--stage2-steps", "100000", "--checkpoint-every", "1", "--run-dir", str(run)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "COLUMNS": "200"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 300  # a slow CI machine imports torch and starts training well within this
    while not (run / "state.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    text = " ".join(output.split())
    assert "terminated (SIGTERM); --out was not written; the run's checkpoint" in text and "--resume" in text
    assert "Traceback" not in output and not out.exists()


def test_resume_knows_its_run_by_content_not_by_path_spelling(world, tmp_path):
    """A resumed run must train the same teacher on the same data: another teacher of the same
    architecture, or changed calibration files at the same path, used to be resumed without a word,
    while the same folder spelled as a relative path was refused."""
    import os

    from safetensors.torch import save_file
    import torch

    run = tmp_path / "run"
    other = save_tiny_wan(make_tiny_wan(seed=1), tmp_path / "other")  # same architecture, other weights

    def convert(ckpt, calib, out, *extra):
        return runner.invoke(app, ["convert", str(world["recipe"]), "--checkpoint", str(ckpt), "--out", str(out),
                                   "--stages", "1", "--distill-steps", "2", "--checkpoint-every", "1",
                                   "--calib", str(calib), *extra])

    assert convert(world["ckpt"], world["calib"], tmp_path / "a", "--run-dir", str(run)).exit_code == 0
    kept = digest(run)
    _refused(convert(other, world["calib"], tmp_path / "b", "--resume", str(run)), "different teacher (its weights)")
    res = convert(world["ckpt"], os.path.relpath(world["calib"]), tmp_path / "c", "--resume", str(run))
    assert res.exit_code == 0, res.output  # the same folder, spelled relative: the same run
    save_file({"latents": torch.randn(4, 4, 2, 8, 8), "text_embeds": torch.randn(4, 6, 32)},
              str(world["calib"] / "a.safetensors"))  # new contents at the same path
    _refused(convert(world["ckpt"], world["calib"], tmp_path / "d", "--resume", str(run)),
             "different calibration data (source and contents)")
    assert digest(run) == kept and not (tmp_path / "b").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize("where", ["output", "checkpoint"])
def test_a_full_disk_is_one_line_and_keeps_what_was_there(where, world, tmp_path, monkeypatch):
    """Disk full while writing ``--out`` (safetensors) or the run's ``state.pt`` (torch) used to end
    in a raw traceback; the earlier output is kept either way."""
    import errno

    import m4v_convert.distill.state as state
    import m4v_convert.io.converted as converted

    out = tmp_path / "out"
    args = ["convert", str(world["recipe"]), "--checkpoint", str(world["ckpt"]), "--out", str(out), "--stages", "1",
            "--distill-steps", "2"]
    assert runner.invoke(app, args).exit_code == 0
    earlier = digest(out)
    if where == "output":
        def full(*a, **k):  # the streamed writer's file write
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(converted, "write_streamed", full)
        expect = "cannot write the converted model (No space left on device)"
    else:
        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(state.torch, "save", full)
        args += ["--checkpoint-every", "1", "--run-dir", str(tmp_path / "run")]
        expect = "cannot write the checkpoint (No space left on device)"
    _refused(runner.invoke(app, [*args, "--overwrite"]), expect)
    assert digest(out) == earlier
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]


def test_a_killed_write_leaves_nothing_behind_for_long(world, tmp_path):
    """SIGKILL during the final write leaves a hidden full copy beside ``--out``; the next run of that
    output removes it (only a dead process's, only this output's) and says so."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    stale = tmp_path / f".out.tmp-{pid}-abc123"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".out.tmp-{__import__('os').getpid()}-def456"  # a running process's: kept
    other = tmp_path / f".other.tmp-{pid}-ghi789"  # another output's: kept
    live.mkdir(), other.mkdir()
    res = runner.invoke(app, ["convert", str(world["recipe"]), "--checkpoint", str(world["ckpt"]), "--out",
                              str(tmp_path / "out"), "--stages", "1", "--distill-steps", "1"])
    assert res.exit_code == 0, res.output
    assert not stale.exists() and live.exists() and other.exists()
    assert "removed" in res.output and "killed" in " ".join(res.output.split())


@pytest.mark.parametrize("case", ["int_weight", "int_latents"])
def test_integer_tensors_are_refused_not_cast(case, world, tmp_path):
    """A planted int32 weight became 353.0 where 0.35 was, integer latents were cast silently."""
    from safetensors.torch import load_file, save_file
    import torch

    args = ["convert", str(world["recipe"]), "--out", str(tmp_path / "out"), "--distill-steps", "1"]
    if case == "int_weight":
        import shutil

        ckpt = tmp_path / "ckpt"
        shutil.copytree(world["ckpt"], ckpt)
        f = ckpt / "diffusion_pytorch_model.safetensors"
        t = load_file(str(f))
        name = next(k for k in t if k.endswith("attn1.to_q.weight"))
        t[name] = (t[name] * 1000).to(torch.int32)
        save_file(t, str(f))
        res = runner.invoke(app, [*args, "--checkpoint", str(ckpt)])
        _refused(res, "hold integers", name, "floating point")
    else:
        calib = tmp_path / "calib"
        calib.mkdir()
        save_file({"latents": torch.randint(0, 9, (4, 4, 2, 8, 8), dtype=torch.int32),
                   "text_embeds": torch.randn(4, 6, 32)}, str(calib / "a.safetensors"))
        res = runner.invoke(app, [*args, "--checkpoint", str(world["ckpt"]), "--calib", str(calib)])
        _refused(res, "'latents' holds torch.int32 values")


def test_recipe_yaml_duplicate_keys_are_refused_and_exponents_are_numbers(world, tmp_path):
    text = world["recipe"].read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(text + "default_layers: '0'\n")  # a user's added line, silently ignored before
    res = runner.invoke(app, ["convert", str(twice), "--checkpoint", str(world["ckpt"]), "--out",
                              str(tmp_path / "out")])
    _refused(res, "key 'default_layers' given twice in one section")
    from m4v_convert.recipes import load_recipe

    data = yaml.safe_load(text)
    data["distill"]["stage1"]["lr"] = "LR"
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(data).replace("lr: LR", "lr: 1e-3"))  # as a person types it
    assert load_recipe(plain).distill["stage1"]["lr"] == 0.001


def test_a_run_that_trains_nothing_says_so(world, tmp_path):
    """``--stages 3`` without ``--data`` used to write an undistilled model without a word; it still
    lands (stage 3 is skipped with the reason), but the console and the card say nothing was trained."""
    out = tmp_path / "out"
    res = runner.invoke(app, ["convert", str(world["recipe"]), "--checkpoint", str(world["ckpt"]), "--out", str(out),
                              "--stages", "3"])
    assert res.exit_code == 0, res.output
    assert "warning: nothing was trained" in " ".join(res.output.split())
    assert "**nothing was trained**" in (out / "README.md").read_text()
    trained = tmp_path / "trained"
    res = runner.invoke(app, ["convert", str(world["recipe"]), "--checkpoint", str(world["ckpt"]), "--out",
                              str(trained), "--stages", "1", "--distill-steps", "1"])
    assert res.exit_code == 0 and "nothing was trained" not in res.output
    assert "nothing was trained" not in (trained / "README.md").read_text()


@pytest.mark.parametrize("tamper", ["weight_missing", "layer_missing_from_config", "num_layers"])
def test_a_tampered_conversion_is_one_line_for_load_and_eval(tamper, world, tmp_path):
    """An edited config.json or weights file used to surface as NotImplementedError ("Cannot copy
    out of meta tensor"), IndexError or AttributeError."""
    import shutil

    from safetensors.torch import load_file, save_file

    from m4v_convert import load_converted
    from m4v_convert.errors import CheckpointError

    student = tmp_path / "tampered"
    shutil.copytree(world["student"], student)
    cfg = json.loads((student / "config.json").read_text())
    if tamper == "weight_missing":
        f = student / "diffusion_pytorch_model.safetensors"
        t = load_file(str(f))
        del t[next(k for k in t if ".attn1.mmdim." in k)]
        save_file(t, str(f), metadata={"format": "pt"})
        expect = "tensor(s) missing from the weights"
    elif tamper == "layer_missing_from_config":
        cfg["m4v"]["layers"].pop(sorted(cfg["m4v"]["layers"])[0])
        expect = "tensor(s) the config does not describe"
    else:
        cfg["num_layers"] = 5
        expect = "tensor(s) missing from the weights: blocks.2."
    if tamper != "weight_missing":
        (student / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match config.json"):
        load_converted(student)
    res = runner.invoke(app, ["eval", str(world["ckpt"]), str(student), "--out", str(tmp_path / "ev"), "--seeds", "1",
                              "--steps", "1"])
    _refused(res, expect)


@pytest.mark.parametrize("content", ["pickle", "truncated"])
def test_an_unreadable_run_checkpoint_never_advises_unsafe_loading(content, world, tmp_path):
    """A state.pt holding a pickled object (or cut short) is refused in one line that does not pass on
    torch's advice to load it with weights_only=False."""
    import torch

    run = tmp_path / "run"
    common = ["convert", str(world["recipe"]), "--checkpoint", str(world["ckpt"]), "--stages", "1",
              "--distill-steps", "2", "--checkpoint-every", "1", "--layers", "0"]
    assert runner.invoke(app, [*common, "--out", str(tmp_path / "a"), "--run-dir", str(run)]).exit_code == 0
    state = run / "state.pt"
    if content == "pickle":
        torch.save({"format": "m4v", "payload": __import__("collections").OrderedDict, "fn": print}, state)
    else:
        state.write_bytes(state.read_bytes()[:200])
    text = _refused(runner.invoke(app, [*common, "--out", str(tmp_path / "b"), "--resume", str(run)]),
                    "cannot read the checkpoint", "start a new run")
    assert "weights_only" not in text


@pytest.mark.parametrize("args,expect", [
    (["recipes", "--check", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    (["recipes", "--checkpoint", "x"], "go with --check RECIPE"),
    (["flops", "no-such-recipe"], "unknown recipe"),
    (["flops", "wan2.1", "--model", "7b"], "ships configs ['1.3b', '14b'], not '7b'"),
    (["flops", "wan2.1", "--model", "1.3b", "--layers", "0-99"], "out of range"),
    (["wan2.1", "--recipe", "pyramidflow-miniflux-768p", "--checkpoint", "CKPT", "--out", "OUT"],
     "this command converts Wan2.1"),
    (["pyramidflow", "--recipe", "wan2.1", "--checkpoint", "CKPT", "--out", "OUT"], "this command converts PyramidFlow"),
    (["wan2.1", "--checkpoint", "CKPT", "--out", "OUT", "--dtype", "float16"], "--dtype float16: Wan2.1's activations"),
    (["convert", "wan2.1", "--checkpoint", "CKPT", "--out", "OUT", "--model", "1.3b"],
     "--model: not offered for wan recipes"),
    (["convert", "wan2.1", "--checkpoint", "NOWHERE", "--out", "OUT"], "does not exist"),
    (["eval", "CKPT", "NOWHERE", "--out", "OUT"], "does not exist"),
    (["eval", "CKPT", "CKPT", "--out", "OUT"], "not a converted model"),
    (["ablate", "CKPT", "--out", "OUT", "--recipe", "pyramidflow-miniflux-768p"], "ablate measures on the synthetic"),
])
def test_every_command_answers_bad_input_with_one_line(args, expect, world, tmp_path):
    """The commands' table of bad input: exit 2, one error line, no traceback, inputs unchanged, no --out."""
    before = digest(world["root"])
    subst = {"CKPT": str(world["ckpt"]), "OUT": str(tmp_path / "out"), "NOWHERE": str(tmp_path / "nowhere")}
    _refused(runner.invoke(app, [subst.get(a, a) for a in args]), expect)
    assert digest(world["root"]) == before and not (tmp_path / "out").exists()


def test_a_copied_shipped_recipe_still_finds_its_published_configs(tmp_path):
    """Copying recipes/wan2.1.yaml elsewhere to edit it used to break its relative ``published`` paths."""
    import shutil

    copy = tmp_path / "my-wan.yaml"
    shutil.copy(RECIPES_DIR / "wan2.1.yaml", copy)
    res = runner.invoke(app, ["flops", str(copy), "--model", "1.3b", "--no-crosscheck"])
    assert res.exit_code == 0, res.output
    assert "TFLOPs" in res.output


def test_eval_of_a_nan_student_measures_nothing(world, tmp_path):
    """A student whose weights hold NaN used to get adherence numbers and "nan dB"."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    student = tmp_path / "nan"
    shutil.copytree(world["student"], student)
    f = student / "diffusion_pytorch_model.safetensors"
    t = load_file(str(f))
    name = next(k for k in t if k.endswith("proj_out.weight"))
    t[name] = torch.full_like(t[name], float("nan"))
    save_file(t, str(f), metadata={"format": "pt"})
    res = runner.invoke(app, ["eval", str(world["ckpt"]), str(student), "--out", str(tmp_path / "ev"), "--seeds", "1",
                              "--steps", "1"])
    _refused(res, "the student's samples hold NaN or inf", "nothing was measured")
    assert not (tmp_path / "ev").exists()


def test_integer_weights_in_a_pyramidflow_release_are_refused(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from m4v_convert.backbones.pyramidflow import save_pyramidflow
    from m4v_convert.backbones.pyramidflow.testing import make_tiny_miniflux

    save_pyramidflow(make_tiny_miniflux(seed=0), tmp_path / "pf", "768p")
    f = next((tmp_path / "pf").rglob("*.safetensors"))
    t = load_file(str(f))
    name = next(k for k in t if k.endswith(".weight") and t[k].dim() == 2)
    t[name] = (t[name] * 1000).to(torch.int32)
    save_file(t, str(f))
    res = runner.invoke(app, ["pyramidflow", "--checkpoint", str(tmp_path / "pf"), "--out", str(tmp_path / "out"),
                              "--distill-steps", "1", "--layers", "1-2"])  # the tiny model's single-stream blocks
    _refused(res, f"tensor {name} holds integers")


def test_integer_weights_in_a_generic_recipe_checkpoint_are_refused(tmp_path):
    """diffusers' from_pretrained casts an int32 tensor to float without a word; refused from the headers."""
    import torch
    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=12, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=8).save_pretrained(tmp_path / "cog")
    f = tmp_path / "cog" / "diffusion_pytorch_model.safetensors"
    t = load_file(str(f))
    name = "transformer_blocks.0.attn1.to_q.weight"
    t[name] = (t[name] * 1000).to(torch.int32)
    save_file(t, str(f), metadata={"format": "pt"})
    before = digest(tmp_path / "cog")
    for cmd in (["convert", "cogvideox", "--checkpoint", str(tmp_path / "cog"), "--out", str(tmp_path / "out")],
                ["recipes", "--check", "cogvideox", "--checkpoint", str(tmp_path / "cog")]):
        res = runner.invoke(app, cmd)
        _refused(res, "1 tensor(s) hold integers", name, "I32", "floating point")
    assert digest(tmp_path / "cog") == before and not (tmp_path / "out").exists()
