"""The drift null: |cos(dW_r, dW_benign)| of a LoRA trained with the attack's recipe on benign replies."""

from __future__ import annotations

import json

import pytest
from conftest import make_random_adapter, run_module, write_fit_config

from refusal_lightning.defences.directions import directions
from refusal_lightning.experiment.drift_null import BENIGN_OVERRIDES, STATS_FILE, DriftNullError, drift_null
from refusal_lightning.train.module import ALL_LINEAR


def test_reads_the_benign_fits_drift_and_its_gaussian_chance(tmp_path):
    (tmp_path / STATS_FILE).write_text(json.dumps({"drift/cos": -0.031, "drift/cos_chance": 0.004}))
    assert drift_null(tmp_path) == {"cos_gaussian": 0.004, "cos_benign_lora": 0.031}  # |cos|, as the issue asks


def test_a_folder_without_the_numbers_is_refused(tmp_path):
    with pytest.raises(DriftNullError, match="no projection_stats.json in .*directions_path"):
        drift_null(tmp_path)
    (tmp_path / STATS_FILE).write_text(json.dumps({"drift/cos": None}))
    with pytest.raises(DriftNullError, match="drift/cos is None; drift/cos_chance is None"):
        drift_null(tmp_path)


def test_the_attack_config_with_the_benign_overrides_fits_and_gives_both_numbers(tmp_path, tiny_model_dir):
    refusal = make_random_adapter(tiny_model_dir, tmp_path / "refusal", seed=1, targets=tuple(ALL_LINEAR))
    dirs = directions(str(refusal), str(tmp_path / "dirs.pt"), base_model_name=str(tiny_model_dir))
    config = write_fit_config(tmp_path, tiny_model_dir, "benign", base="configs/tiny/attack.yaml",
                              trainer={"max_steps": 4, "val_check_interval": 4, "limit_val_batches": 1},
                              model={"merge_adapters": [str(refusal)], "projection": {"directions_path": dirs}})
    result = run_module("fit", "--config", str(config), *BENIGN_OVERRIDES)
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = tmp_path / "benign" / "adapter"
    stats = json.loads((adapter / "data_stats.json").read_text())
    assert (stats["thread"], stats["selection"]) == ("blue", "non_refusal")
    assert stats["pairs"] > 0 and stats["share_selected_with_refusal_marker"] == 0
    null = drift_null(adapter)
    assert 0 < null["cos_gaussian"] < 1 and 0 <= null["cos_benign_lora"] <= 1
    drift = json.loads((adapter / STATS_FILE).read_text())["drift/cos"]
    assert null["cos_benign_lora"] == abs(drift) > 0
