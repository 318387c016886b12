"""The attack's trajectory: ``model.trajectory_steps`` snapshots, and ``data.order_seed`` (the sweep's seeds)."""

from __future__ import annotations

import pytest
from conftest import assert_same_adapter, run_module, write_fit_config

from refusal_lightning.train.datamodule import HarmfulQADataModule


def _fit(tmp_path, model_dir, name, max_steps, *extra):
    config = write_fit_config(tmp_path, model_dir, name, trainer={
        "max_steps": max_steps, "accumulate_grad_batches": 2, "limit_val_batches": 0, "val_check_interval": None,
        "check_val_every_n_epoch": 1})
    done = run_module("fit", "--config", str(config), *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / name / "adapter"


def test_a_snapshot_is_the_adapter_after_that_many_optimizer_steps(tmp_path, tiny_model_dir):
    long = _fit(tmp_path, tiny_model_dir, "long", 4, "--model.trajectory_steps=[2, 4]")
    short = _fit(tmp_path, tiny_model_dir, "short", 2)
    assert sorted(p.name for p in (long / "steps").iterdir()) == ["2", "4"]
    assert_same_adapter(long / "steps" / "4", long)  # the last snapshot is the fit's own adapter
    assert_same_adapter(long / "steps" / "2", short)  # step 2 of a longer fit = a fit stopped at step 2
    with pytest.raises(AssertionError):
        assert_same_adapter(long / "steps" / "2", long)  # the two points differ: the check means something


def test_trajectory_step_zero_is_refused(tmp_path, tiny_model_dir):
    config = write_fit_config(tmp_path, tiny_model_dir, "zero", trainer={"max_steps": 1})
    done = run_module("fit", "--config", str(config), "--model.trajectory_steps=[0, 1]")
    assert done.returncode == 2
    assert "trajectory_steps are optimizer steps >= 1" in done.stderr


def _first_batches(dm: HarmfulQADataModule, n: int = 3) -> list[list[int]]:
    dm.setup("fit")
    batches = []
    for batch in dm.train_dataloader():
        batches.append(batch["attention_mask"].sum(1).tolist())
        if len(batches) == n:
            break
    return batches


def test_order_seed_moves_the_batch_order_and_not_the_split(tiny_model_dir):
    def module(order_seed):
        return HarmfulQADataModule(tokenizer_name_or_path=str(tiny_model_dir), val_fraction=0.2, seed=0,
                                   order_seed=order_seed, batch_size=4)

    default, same, other = module(None), module(0), module(1)
    assert _first_batches(default) == _first_batches(same)  # None is the split's seed: fits of before unchanged
    assert _first_batches(other) != _first_batches(default)
    assert other.train_set.question_ids == default.train_set.question_ids
    assert other.val_set.question_ids == default.val_set.question_ids
