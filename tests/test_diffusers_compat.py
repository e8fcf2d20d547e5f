"""The converted model as a diffusers model (issue 36): what diffusers' own model tests ask of the
stock class, asked of the converted one: gradient checkpointing through
``enable_gradient_checkpointing()`` and ``torch.compile(fullgraph=True)``."""

import copy

import pytest
import torch

from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel
from m4v_convert.backbones.wan.testing import make_tiny_wan, tiny_wan_inputs
from m4v_convert.recipes import load_recipe


@pytest.fixture(scope="module")
def converted():
    teacher = make_tiny_wan(seed=0)
    torch.manual_seed(0)
    model = M4VWanTransformer3DModel.from_teacher(teacher)
    model.convert_([0, 1], {**load_recipe("wan2.1").mmdim, "temporal_dim": 8, "temporal_heads": 2})
    return model.eval(), tiny_wan_inputs(teacher, batch=2)


def test_gradient_checkpointing_gives_the_same_gradients(converted):
    """As diffusers' ``test_effective_gradient_checkpointing``: the same loss and gradients with and
    without; it used to raise "WanMMDiMAttention needs the frame grid and text of the current call"
    (the forward clears the call context before backward recomputes the blocks)."""
    model, batch = converted

    def grads(m):
        m.zero_grad(set_to_none=True)
        m.train()
        out = m(**batch, return_dict=False)[0]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain = copy.deepcopy(model)
    checkpointed = copy.deepcopy(model)
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.is_gradient_checkpointing
    recomputed = {"n": 0}
    for block in checkpointed.blocks:
        block.attn1.register_forward_hook(lambda *a: recomputed.__setitem__("n", recomputed["n"] + 1))
    out_a, g_a = grads(plain)
    out_b, g_b = grads(checkpointed)
    assert recomputed["n"] == 2 * len(checkpointed.blocks)  # each block ran again in backward
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    assert set(g_a) == set(g_b) and any(".mmdim." in n for n in g_a)
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_torch_compile_fullgraph_matches_eager(converted):
    """No graph break (it broke at ``storage_offset()`` in the RoPE of B/C). The aot_eager backend
    traces through dynamo and AOTAutograd as inductor does, without its minute of C++ codegen on
    this CPU (inductor itself: compiled in 52 s, max difference 8e-7, measured 2026-12-06)."""
    model, batch = converted
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = model(**batch, return_dict=False)[0]
        got = compiled(**batch, return_dict=False)[0]
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ pipeline out

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from cli import app  # noqa: E402

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
GENERATE = dict(prompt="a red ball rolls left", num_frames=5, height=16, width=16, num_inference_steps=2,
                output_type="pt", max_sequence_length=8, guidance_scale=1.0)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def wan_pipeline(tmp_path_factory):
    from m4v_convert.backbones.wan.testing import make_tiny_wan_pipeline

    folder = tmp_path_factory.mktemp("pipe") / "Wan2.1-T2V-tiny-Diffusers"
    make_tiny_wan_pipeline(seed=0).save_pretrained(folder)
    return folder


def _fresh_process(code: str, tmp_path: Path, *args: str) -> str:
    """Run ``code`` in a new interpreter that has not imported the toolkit (offline, own HF cache)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_a_pipeline_folder_in_gives_a_pipeline_folder_out(wan_pipeline, tmp_path):
    """diffusers alone (``trust_remote_code=True``, no toolkit import) loads the converted pipeline,
    and its frames equal those of ``WanPipeline`` given ``load_converted``'s transformer; the input is
    byte-identical afterwards; the other components are hard links (copies with --copy-components)."""
    import m4v_convert
    from diffusers import WanPipeline

    before = digest(wan_pipeline)
    out = tmp_path / "out"
    res = runner.invoke(app, ["wan2.1", "--checkpoint", str(wan_pipeline), "--out", str(out), "--layers", "all",
                              "--distill-steps", "2", "--stage2-steps", "1"])
    assert res.exit_code == 0, res.output
    assert "pipeline folder in: --out will be the pipeline with the converted transformer/" in res.output
    assert digest(wan_pipeline) == before
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["m4v_transformer", "M4VWanTransformer3DModel"]
    assert {k: v for k, v in index.items() if k != "transformer"} == \
        {k: v for k, v in json.loads((wan_pipeline / "model_index.json").read_text()).items() if k != "transformer"}
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        assert digest(out / name) == digest(wan_pipeline / name)
    weights = "vae/diffusion_pytorch_model.safetensors"
    assert (out / weights).stat().st_ino == (wan_pipeline / weights).stat().st_ino  # a hard link
    assert m4v_convert.load_converted(out).converted_layers == [0, 1]  # the pipeline folder finds transformer/

    frames = _fresh_process(
        "import sys, torch\n"
        "from diffusers import DiffusionPipeline\n"
        "assert 'm4v_convert' not in sys.modules  # the caller never imports the toolkit\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "print(type(pipe).__name__, type(pipe.transformer).__name__, pipe.transformer.converted_layers)\n"
        f"f = pipe(generator=torch.Generator().manual_seed(0), **{GENERATE!r}).frames\n"
        "torch.save(f, sys.argv[2])\n", tmp_path, str(out), str(tmp_path / "frames.pt"))
    assert "WanPipeline M4VWanTransformer3DModel [0, 1]" in frames
    reference = WanPipeline.from_pretrained(wan_pipeline, transformer=m4v_convert.load_converted(out / "transformer"))
    want = reference(generator=torch.Generator().manual_seed(0), **GENERATE).frames
    got = torch.load(tmp_path / "frames.pt", weights_only=True)
    assert got.shape == want.shape and torch.isfinite(got).all() and torch.equal(got, want)
    loaded = m4v_convert.load_pipeline(out)  # no remote code
    assert type(loaded) is WanPipeline and type(loaded.transformer).__name__ == "M4VWanTransformer3DModel"
    assert torch.equal(loaded(generator=torch.Generator().manual_seed(0), **GENERATE).frames, want)

    copied = tmp_path / "copied"
    res = runner.invoke(app, ["wan2.1", "--checkpoint", str(wan_pipeline), "--out", str(copied), "--layers", "0",
                              "--distill-steps", "0", "--stage2-steps", "0", "--copy-components"])
    assert res.exit_code == 0, res.output
    assert (copied / weights).stat().st_ino != (wan_pipeline / weights).stat().st_ino
    assert digest(copied / "vae") == digest(wan_pipeline / "vae") and digest(wan_pipeline) == before


def test_the_stock_class_refuses_a_converted_folder_and_automodel_loads_it(wan_pipeline, tmp_path):
    """``WanTransformer3DModel.from_pretrained(converted)`` returned the attention layers freshly
    initialised (the MM-DiM weights dropped); now it stops, naming load_converted."""
    import m4v_convert

    out = tmp_path / "out"
    res = runner.invoke(app, ["wan2.1", "--checkpoint", str(wan_pipeline / "transformer"), "--out", str(out),
                              "--distill-steps", "1", "--stage2-steps", "0"])
    assert res.exit_code == 0, res.output
    assert "not a diffusers pipeline folder" in " ".join(res.output.split())  # a bare transformer in: one line
    assert not (out / "model_index.json").exists() and (out / "m4v_transformer.py").is_file()
    got = _fresh_process(
        "import sys, torch\n"
        "from diffusers import AutoModel, WanTransformer3DModel\n"
        "try:\n"
        "    WanTransformer3DModel.from_pretrained(sys.argv[1])\n"
        "    print('LOADED')\n"
        "except ValueError as e:\n"
        "    print('REFUSED', e)\n"
        "m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "torch.save(m.state_dict(), sys.argv[2])\n"
        "print('AUTO', type(m).__name__, m.converted_layers)\n", tmp_path, str(out), str(tmp_path / "state.pt"))
    assert "LOADED" not in got and "REFUSED" in got and "m4v_convert.load_converted(folder)" in got
    assert "AUTO M4VWanTransformer3DModel [0, 1]" in got
    want = m4v_convert.load_converted(out).state_dict()
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert set(state) == set(want) and all(torch.equal(state[k], want[k]) for k in want)


def test_a_generic_recipe_writes_the_pipeline_too(wan_pipeline, tmp_path):
    """wan2.2-ti2v.yaml (the generic path) on a Wan pipeline folder: the same pipeline out, loaded by
    diffusers alone into the generic converted class."""
    out = tmp_path / "out"
    res = runner.invoke(app, ["convert", "wan2.2-ti2v", "--checkpoint", str(wan_pipeline), "--out", str(out),
                              "--distill-steps", "1", "--stage2-steps", "0"])
    assert res.exit_code == 0, res.output
    got = _fresh_process(
        "import sys, torch\n"
        "from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "print(type(pipe.transformer).__module__, pipe.transformer.converted_layers)\n"
        f"f = pipe(generator=torch.Generator().manual_seed(0), **{GENERATE!r}).frames\n"
        "print('finite', bool(torch.isfinite(f).all()), tuple(f.shape))\n", tmp_path, str(out))
    assert "m4v_convert.backbones.generic.model [0, 1]" in got and "finite True (1, 5, 3, 16, 16)" in got


def test_a_cogvideox_pipeline_converts_into_a_pipeline(tmp_path):
    """CogVideoX-2B's layout (no RoPE: position embeddings cover exactly max_text_seq_length text
    tokens, 16 here, where the recipe's synthetic text has 8: the conversion stopped with a size
    mismatch) in a CogVideoXPipeline folder: the converted pipeline loads with diffusers alone."""
    from m4v_convert.backbones.generic.testing import make_tiny_cogvideox_pipeline

    make_tiny_cogvideox_pipeline(seed=0, max_text_seq_length=16).save_pretrained(tmp_path / "cog")
    out = tmp_path / "out"
    res = runner.invoke(app, ["convert", "cogvideox", "--checkpoint", str(tmp_path / "cog"), "--out", str(out),
                              "--distill-steps", "1", "--stage2-steps", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "model_index.json").read_text())["transformer"] == \
        ["m4v_transformer", "M4VCogVideoXTransformer3DModel"]
    got = _fresh_process(
        "import sys, torch\n"
        "from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "print(type(pipe).__name__, type(pipe.transformer).__name__, pipe.transformer.converted_layers)\n"
        "f = pipe('a red ball rolls left', num_frames=5, height=16, width=16, num_inference_steps=2,\n"
        "         generator=torch.Generator().manual_seed(0), output_type='pt', max_sequence_length=16,\n"
        "         guidance_scale=1.0).frames\n"
        "print('finite', bool(torch.isfinite(f).all()))\n", tmp_path, str(out))
    assert "CogVideoXPipeline M4VCogVideoXTransformer3DModel [0, 1]" in got and "finite True" in got
