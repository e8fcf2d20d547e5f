"""Test-wide settings: the models under test are tiny, and on 2 shared cores a single intra-op
thread runs them several times faster than torch's default thread pool (and more repeatably)."""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses started by tests
torch.set_num_threads(1)
