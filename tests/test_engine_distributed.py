"""Which device each process takes (mae_transfer.engine.distributed), on a machine faked to have GPUs."""
import pytest
import torch

from mae_transfer.engine.distributed import distributed_run, init_distributed


@pytest.fixture
def gpus(monkeypatch):
    """A machine showing `n` GPUs: returns a setter; the device torch.cuda.set_device was given is recorded."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)

    def show(n):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        return chosen
    return show


def _launched(monkeypatch, local_rank, world_size):
    """torchrun's environment for one process (no process group is joined: world_size 1, or refused before)."""
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))


def test_each_process_takes_the_gpu_of_its_local_rank(gpus, monkeypatch):
    chosen = gpus(8)
    _launched(monkeypatch, local_rank=3, world_size=1)
    assert init_distributed("cuda").device == torch.device("cuda", 3)
    assert chosen == [torch.device("cuda", 3)]


def test_a_gpu_run_autotunes_cudnn_and_puts_the_setting_back(gpus, monkeypatch):
    gpus(1)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with distributed_run("cpu"):
        assert not torch.backends.cudnn.benchmark
    with distributed_run("cuda"):
        assert torch.backends.cudnn.benchmark  # as the reference's scripts
    assert not torch.backends.cudnn.benchmark


def test_a_process_shown_only_its_own_gpu_takes_cuda_0(gpus, monkeypatch):
    gpus(1)  # e.g. SLURM's --gpus-per-task=1: CUDA_VISIBLE_DEVICES holds this process's GPU only
    _launched(monkeypatch, local_rank=5, world_size=1)
    assert init_distributed(None).device == torch.device("cuda", 0)


def test_more_processes_than_gpus_are_refused(gpus, monkeypatch):
    gpus(8)
    for local_rank in (8, 9):  # GPUs 0..7
        _launched(monkeypatch, local_rank=local_rank, world_size=1)
        with pytest.raises(ValueError, match=rf"process {local_rank} of this node has no GPU of its own: 8 are "
                                             r"visible"):
            init_distributed("cuda")


def test_one_explicit_gpu_for_several_processes_is_refused(gpus, monkeypatch):
    gpus(8)
    _launched(monkeypatch, local_rank=0, world_size=4)
    with pytest.raises(ValueError, match=r"--device cuda:1 would put all 4 processes on one GPU"):
        init_distributed("cuda:1")


def test_collectives_wait_as_long_as_in_detectron2(monkeypatch):
    """Rank 0 writing a large checkpoint keeps the others waiting at the next all-reduce: NCCL's default 10 minutes
    would end the run; detectron2's launch waits 30."""
    from detectron2.engine.launch import DEFAULT_TIMEOUT
    joined = {}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: joined.update(kw, backend=backend))
    _launched(monkeypatch, local_rank=1, world_size=2)
    init_distributed("cpu")
    assert joined["backend"] == "gloo" and joined["timeout"] == DEFAULT_TIMEOUT
