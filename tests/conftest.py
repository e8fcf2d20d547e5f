"""Test-wide settings: the models under test are tiny, and on 2 shared cores a single intra-op
thread runs them several times faster than torch's default thread pool (and more repeatably)."""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses started by tests
torch.set_num_threads(1)
if not torch.cuda.is_available():
    # mamba-ssm's Triton kernels run on CPU tensors in Triton's interpreter (tests/test_triton_interpreted.py).
    # Triton reads this when a kernel is decorated, so before anything imports mamba-ssm; with a CUDA
    # device the compiled kernels run instead (tests/test_gpu.py). backend="auto" never picks it.
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture
def interrupt_stage2(monkeypatch):
    """``interrupt_stage2(n)``: the n-th stage-2 loss call raises KeyboardInterrupt (a Ctrl-C mid-stage);
    ``interrupt_stage2(None)`` restores the real loss."""
    from m4v_convert.distill.stage2 import Stage2Task

    loss = Stage2Task.loss

    def arm(n):
        if n is None:
            monkeypatch.setattr(Stage2Task, "loss", loss)
            return
        calls = {"n": 0}

        def interrupted(self, batch):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return loss(self, batch)

        monkeypatch.setattr(Stage2Task, "loss", interrupted)

    return arm


@pytest.fixture(autouse=True)
def _memory_plan_only_where_tested(request, monkeypatch):
    """The memory plan's meta-device passes cost seconds per conversion; the suite's ~150 other
    conversions test other things, so it runs only in tests marked ``memory_plan``
    (tests/test_memory_plan.py). Subprocess conversions run it as a user's would."""
    if request.node.get_closest_marker("memory_plan") is None:
        from m4v_convert.jobs import memory

        monkeypatch.setattr(memory, "plan_memory", lambda plan, steps, world: None)
