import os

import pytest
import torch

# Two cores are shared by everything on the test machine; tiny models do not gain from more threads.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fp32_matmuls():
    """CUDA matmuls in true fp32 (TF32 off) for the test, restored after: the truth low-precision runs follow.
    (monkeypatch cannot restore it: the flag is not an attribute of torch.backends.cuda.matmul's object.)"""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before
