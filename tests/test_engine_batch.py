"""The batch plan and loader the training scripts share: whole optimizer steps, disjoint shards, clear refusals."""
import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

from mae_transfer.engine import BatchPlan, BatchPlanError, DistInfo, training_loader


def _dist(rank: int = 0, world_size: int = 1) -> DistInfo:
    return DistInfo(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))


def test_an_epoch_is_a_whole_number_of_optimizer_steps():
    data = TensorDataset(torch.arange(10))
    loader, plan = training_loader(data, _dist(), batch_size=2, seed=0, num_workers=0, pin_mem=True, accum_iter=2)
    # 5 batches of 2, accumulated by 2: the fifth batch would start a step the epoch cannot finish
    assert plan == BatchPlan(batch_size=2, accum_iter=2, world_size=1, iters_per_epoch=4) and len(loader) == 5
    assert str(plan) == "effective batch 4 = 2 x 2 (accum) x 1 (processes)"
    assert not loader.pin_memory  # pinning is for copies to a GPU
    _, by_target = training_loader(data, _dist(), batch_size=1, seed=0, num_workers=0, pin_mem=False,
                                   effective_batch_size=4)
    assert (by_target.accum_iter, by_target.iters_per_epoch) == (4, 8)


def test_processes_draw_disjoint_shards_that_cover_the_data():
    data = TensorDataset(torch.arange(8))
    seen = []
    for rank in range(2):
        loader, plan = training_loader(data, _dist(rank, world_size=2), batch_size=2, seed=3, num_workers=0,
                                       pin_mem=False)
        assert plan.effective == 4 and plan.iters_per_epoch == 2
        loader.sampler.set_epoch(1)
        seen += [i for (batch,) in loader for i in batch.tolist()]
    assert sorted(seen) == list(range(8))


def test_the_shuffle_is_the_distributed_sampler_s_of_the_run_seed():
    data = TensorDataset(torch.arange(16))
    orders = []
    for seed in (0, 1):
        loader, _ = training_loader(data, _dist(), batch_size=4, seed=seed, num_workers=0, pin_mem=False)
        loader.sampler.set_epoch(2)
        reference = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=seed)
        reference.set_epoch(2)
        orders.append(list(loader.sampler))
        assert orders[-1] == list(reference)
    assert orders[0] != orders[1]


def test_too_little_data_or_contradicting_flags_are_refused_by_name():
    with pytest.raises(BatchPlanError, match=r"3 training images are too few for one optimizer step of 2 x 2 "
                                         r"\(accum_iter\) x 1 \(processes\)"):
        training_loader(TensorDataset(torch.arange(3)), _dist(), batch_size=2, seed=0, num_workers=0,
                        pin_mem=False, accum_iter=2)
    with pytest.raises(BatchPlanError, match="--accum_iter 3 contradicts --effective_batch_size 8"):
        training_loader(TensorDataset(torch.arange(8)), _dist(), batch_size=2, seed=0, num_workers=0,
                        pin_mem=False, accum_iter=3, effective_batch_size=8)
