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
