"""The resumable training loader: order and augmentation depend only on (seed, epoch, image); a restored state
continues the epoch exactly where the trainer stopped; DDP ranks share one permutation."""

from unittest import mock

import torch
from torch.utils.data import DataLoader, Dataset

from dalg.lit.resumable_data import EpochPermutation, ResumableLoader


class _Noisy(Dataset):
    """Item i = (i, a random number drawn from torch's global RNG), like a random augmentation."""

    def __len__(self):
        return 23

    def __getitem__(self, i):
        return torch.tensor(i), torch.rand(())


def _epoch(loader, epoch):
    loader.permutation.set_epoch(epoch)
    return [(idx.tolist(), noise.tolist()) for idx, noise in loader]


def test_same_seed_same_epoch_same_batches_and_augmentations():
    a = ResumableLoader(_Noisy(), batch_size=4, seed=3)
    b = ResumableLoader(_Noisy(), batch_size=4, seed=3)
    torch.rand(5)  # the global RNG state does not matter
    assert _epoch(a, 0) == _epoch(b, 0)
    assert _epoch(a, 1) != _epoch(a, 0)
    assert _epoch(ResumableLoader(_Noisy(), batch_size=4, seed=4), 0) != _epoch(b, 0)
    assert len(_epoch(a, 0)) == 23 // 4  # drop_last


def test_restored_state_continues_the_epoch():
    progress = {"n": 0}
    full = _epoch(ResumableLoader(_Noisy(), batch_size=4, seed=7), 2)
    loader = ResumableLoader(_Noisy(), batch_size=4, seed=7, consumed_batches=lambda: progress["n"])
    loader.permutation.set_epoch(2)
    it = iter(loader)
    seen = [next(it), next(it), next(it)]  # the third batch is prefetched, not trained on
    progress["n"] = 2
    state = loader.state_dict()
    assert state == {"epoch": 2, "consumed_batches": 2, "seed": 7}
    resumed = ResumableLoader(_Noisy(), batch_size=4, seed=7)
    resumed.load_state_dict(state)
    resumed.permutation.set_epoch(2)  # what Lightning calls before the epoch
    rest = [(i.tolist(), n.tolist()) for i, n in resumed]
    assert [(i.tolist(), n.tolist()) for i, n in seen[:2]] + rest == full
    # the next epoch starts from its own beginning
    assert _epoch(resumed, 3) == _epoch(ResumableLoader(_Noisy(), batch_size=4, seed=7), 3)


def test_state_saved_at_epoch_end_starts_the_next_epoch():
    loader = ResumableLoader(_Noisy(), batch_size=4, seed=1)
    loader.load_state_dict({"epoch": 4, "consumed_batches": 5, "seed": 1})
    assert loader.permutation.epoch == 5 and loader.permutation.skip == 0


def test_worker_processes_do_not_change_augmentations():
    a = _epoch(ResumableLoader(_Noisy(), batch_size=4, seed=5), 0)
    b = _epoch(ResumableLoader(_Noisy(), batch_size=4, seed=5, num_workers=2), 0)
    assert a == b


def test_two_ranks_split_one_permutation():
    shares = []
    for rank in (0, 1):
        with mock.patch("dalg.lit.resumable_data._rank_world", return_value=(rank, 2)):
            p = EpochPermutation(9, seed=0)
            p.set_epoch(1)
            shares.append([i for i, _ in p])
            assert len(p) == 5
    assert len(shares[0]) == len(shares[1]) == 5
    assert set(shares[0]) | set(shares[1]) == set(range(9))
    assert len(set(shares[0]) & set(shares[1])) == 1  # one padded duplicate, as DistributedSampler


def test_wrap_keeps_the_loader_settings():
    src = DataLoader(_Noisy(), batch_size=6, shuffle=True, drop_last=True, num_workers=0)
    wrapped = ResumableLoader.wrap(src, seed=0)
    assert wrapped.batch_sampler.batch_size == 6 and wrapped.batch_sampler.drop_last
    assert len(wrapped) == len(src)
