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
