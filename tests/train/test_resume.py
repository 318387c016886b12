"""Exact resume in any epoch: the sampler's epoch and position travel in the checkpoint.

A fit killed like SIGKILL (``os._exit`` in a callback) and resumed with ``--ckpt_path last`` must end with
the adapter of the uninterrupted run, wherever it died: mid-epoch in a later epoch, or right at an epoch
boundary, with gradient accumulation on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CRASH_CALLBACK, assert_same_adapter, callback_env, run_module, write_fit_config

from refusal_lightning.train.datamodule import LengthGroupedSampler


def _batches(loader, n: int) -> list[list[int]]:
    """The first ``n`` batches' input lengths (a fingerprint of which rows came in which batch)."""
    out = []
    for batch in loader:
        out.append(batch["attention_mask"].sum(1).tolist())
        if len(out) == n:
            break
    return out


def _loader(lengths: list[int], epoch: int | None = None):
    from torchdata.stateful_dataloader import StatefulDataLoader

    from refusal_lightning.train.datamodule import collate

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(lengths)

        def __getitem__(self, i):
            return {"input_ids": [1] * lengths[i], "labels": [1] * lengths[i]}

    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=3, mega_factor=2)
    if epoch is not None:
        sampler.set_epoch(epoch)
    return StatefulDataLoader(Rows(), batch_size=4, sampler=sampler, collate_fn=collate(0))


def test_loader_state_restores_the_samplers_epoch_and_position():
    # What Lightning does on resume: a fresh loader (its sampler at epoch 0) loads the saved state and is
    # iterated before set_epoch is called again. Before the fix it replayed epoch 0's order.
    lengths = [5 + (i * 7) % 23 for i in range(38)]
    straight = _loader(lengths, epoch=2)
    expected = _batches(straight, 10)
    interrupted = _loader(lengths, epoch=2)
    _batches(interrupted, 4)
    state = interrupted.state_dict()
    resumed = _loader(lengths)
    resumed.load_state_dict(state)
    assert _batches(resumed, 6) == expected[4:]
    assert _batches(_loader(lengths, epoch=0), 10) != expected  # epochs differ, so the check means something


def test_loader_state_saved_on_the_last_batch_resumes_with_the_next_epoch():
    # Lightning resumes a fit saved on an epoch's last batch in the next epoch but first iterates the
    # restored iterator: it must hold the next epoch, not an exhausted one (which would skip an epoch).
    lengths = [5 + (i * 7) % 23 for i in range(38)]
    finished = _loader(lengths, epoch=2)
    assert len(_batches(finished, 100)) == 10
    resumed = _loader(lengths)
    resumed.load_state_dict(finished.state_dict())
    assert _batches(resumed, 100) == _batches(_loader(lengths, epoch=3), 100)


def test_partial_batch_comes_last_so_loader_batches_equal_sampler_batches():
    lengths = [5 + (i * 7) % 23 for i in range(38)]  # 38 rows, batch 4: one partial batch of 2
    for replicas in (1, 2, 3):
        for rank in range(replicas):
            sampler = LengthGroupedSampler(lengths, 4, seed=1, mega_factor=2, num_replicas=replicas, rank=rank)
            batches = sampler._batches()
            assert all(len(b) == 4 for b in batches[:-1])
            from torchdata.stateful_dataloader import StatefulDataLoader

            loader = StatefulDataLoader(list(range(len(lengths))), batch_size=4, sampler=sampler)
            assert [b.tolist() for b in loader] == batches


def _fit(tmp_path: Path, model_dir: Path, name: str, *extra: str, env: dict | None = None):
    common = {"trainer": {"max_steps": 14, "accumulate_grad_batches": 2, "limit_val_batches": 0,
                          "val_check_interval": None, "check_val_every_n_epoch": 1},
              "data": {"batch_size": 16}, "ckpt_every": 2}
    config = write_fit_config(tmp_path, model_dir, name, **common)
    return run_module("fit", "--config", str(config), *extra, env=env)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_model_dir) -> Path:
    tmp = tmp_path_factory.mktemp("straight")
    straight = _fit(tmp, tiny_model_dir, "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    return tmp / "straight/adapter"


@pytest.mark.slow
@pytest.mark.parametrize("crash_step,saved_step", [(11, 10), (13, 12)], ids=["mid-epoch-2", "end-of-epoch-2"])
def test_resume_in_a_later_epoch_matches_uninterrupted(tmp_path, tiny_model_dir, straight_run, crash_step,
                                                       saved_step):
    # The sample's 120 train pairs in batches of 16: 8 batches an epoch, 4 optimizer steps with accumulation 2,
    # so epoch 2 holds steps 9-12: step 10 is mid-epoch, step 12 its last batch.
    env = callback_env(tmp_path, "crash_cb", CRASH_CALLBACK)
    died = _fit(tmp_path, tiny_model_dir, "crashed", "--trainer.callbacks+=crash_cb.CrashAfter",
                f"--trainer.callbacks.step={crash_step}", env=env)
    assert died.returncode == 9, died.stderr[-3000:]
    ckpt = torch.load(tmp_path / "crashed/adapter/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == saved_step and ckpt["epoch"] == 2
    resumed = _fit(tmp_path, tiny_model_dir, "crashed", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_adapter(straight_run, tmp_path / "crashed/adapter")
