"""One model, shared weights (issue 38 part 1): the student shares every tensor the conversion does not
replace with the teacher, so nothing untouched is held twice; training never changes the teacher, and the
output is the one an independent copy of the teacher gives, bit for bit."""

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel
from m4v_convert.backbones.wan.testing import make_tiny_wan, save_tiny_wan, tiny_wan_inputs
from m4v_convert.models.converted import ConvertedModelMixin
from m4v_convert.recipes import load_recipe

runner = CliRunner()


def test_the_student_holds_only_its_converted_layers_of_its_own():
    teacher = make_tiny_wan(seed=0)
    student = M4VWanTransformer3DModel.from_teacher(teacher)
    student.convert_([0], {**load_recipe("wan2.1").mmdim, "temporal_dim": 8, "temporal_heads": 2})
    held = {id(p) for p in teacher.parameters()}
    own = [n for n, p in student.named_parameters() if id(p) not in held]
    shared = [n for n, p in student.named_parameters() if id(p) in held]
    assert own and all(n.startswith("blocks.0.attn1.mmdim.") for n in own)
    assert all(p is teacher.get_parameter(n) for n, p in student.named_parameters() if n in shared)
    assert {id(b) for b in student.buffers()} <= {id(b) for b in teacher.buffers()}
    # the teacher keeps its attention; the student (and so its saved state) holds none of a converted layer's
    assert "blocks.0.attn1.to_q.weight" in dict(teacher.named_parameters())
    assert not any(k.startswith("blocks.0.attn1.to_") for k in student.state_dict())
    assert any(k.startswith("blocks.1.attn1.to_q") for k in student.state_dict())  # not converted


def _weights(folder):
    files = sorted(folder.rglob("*.safetensors"))
    assert files, folder
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("train", ["mmdim", "all", "lora"])
def test_sharing_changes_no_output_and_never_the_teacher(tmp_path, monkeypatch, train):
    from m4v_convert.backbones.wan.conversion import WanConversion
    from m4v_convert.backbones.wan.load import load_wan_transformer

    ckpt = save_tiny_wan(make_tiny_wan(seed=0), tmp_path / "ckpt")
    args = ["wan2.1", "--checkpoint", str(ckpt), "--layers", "all", "--distill-steps", "2", "--stage2-steps", "2",
            "--train", train, "--lr", "0.01"]
    teachers = []
    load = WanConversion.load_teacher
    monkeypatch.setattr(WanConversion, "load_teacher", lambda self: teachers.append(load(self)) or teachers[-1])
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "shared")])
    assert res.exit_code == 0, res.output

    # the teacher after the whole run (stage 2 trains every weight with --train all, LoRA merges): unchanged
    fresh = load_wan_transformer(ckpt)
    assert teachers[0].state_dict().keys() == fresh.state_dict().keys()
    for name, t in fresh.state_dict().items():
        assert torch.equal(teachers[0].state_dict()[name], t), name
    batch = tiny_wan_inputs(fresh, batch=1)
    with torch.no_grad():
        assert torch.equal(teachers[0](**batch).sample, fresh(**batch).sample)

    # the output equals the one of an independent copy (the student before shared weights)
    share = ConvertedModelMixin.from_teacher.__func__
    monkeypatch.setattr(ConvertedModelMixin, "from_teacher",
                        classmethod(lambda cls, teacher, *a: share(cls, teacher, *a, share=False)))
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "copied")])
    assert res.exit_code == 0, res.output
    shared, copied = _weights(tmp_path / "shared"), _weights(tmp_path / "copied")
    assert shared.keys() == copied.keys()
    changed = [k for k in shared if not torch.equal(shared[k], fresh.state_dict().get(k, shared[k]))]
    if train != "mmdim":
        assert changed, "stage 2 trained nothing outside MM-DiM"  # the test would not see a shared update
    for k in shared:
        assert torch.equal(shared[k], copied[k]), k


def test_param_groups_cut_the_trained_weights_at_each_groups_first_layer():
    """Stages 2/3 with --layer-groups: every trained weight in exactly one group; a group holds its
    layers' MM-DiMs and, with --train all, what lies between them and the next group (embeddings in the
    first, the output head in the last)."""
    from m4v_convert.distill.job import layer_groups, param_groups
    from m4v_convert.distill.params import trainable_params

    teacher = make_tiny_wan(seed=0)
    student = M4VWanTransformer3DModel.from_teacher(teacher)
    student.convert_([0, 1], {**load_recipe("wan2.1").mmdim, "temporal_dim": 8, "temporal_heads": 2})
    blocks = {i: student.blocks[i].attn1.mmdim for i in (0, 1)}
    groups = layer_groups([0, 1], 2)
    for mode in ("mmdim", "all"):
        params = trainable_params(student, mode, blocks)
        parts = param_groups(student, params, blocks, groups)
        assert [n for part in parts for n in part] == list(params)  # each once, in the model's order
        for g, part in enumerate(parts):
            assert any(n.startswith(f"blocks.{g}.attn1.mmdim.") for n in part)
            assert all(n.startswith(f"blocks.{g}.") or not n.startswith("blocks.") for n in part)
    assert any(n.startswith("patch_embedding.") for n in parts[0]) and any(n.startswith("proj_out.") for n in parts[1])
    assert all(n.startswith("blocks.0.attn1.mmdim.") for n in param_groups(
        student, trainable_params(student, "mmdim", blocks), blocks, groups)[0])
