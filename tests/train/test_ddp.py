"""DDP on 2 CPU processes (gloo): every row once per epoch, ranks in lockstep, the projection holds, exact resume.

The orthogonal attack config from the CLI, as a user runs it with ``--trainer.devices 2 --trainer.strategy ddp``.
Its "refusal" adapter is fitted on the attack's own (red) data, so that an unprojected attack would retrace it
and "stays orthogonal" means something (see test_projection_training.py).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CRASH_CALLBACK, REPO, assert_same_adapter, run_module, write_fit_config
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

CALLBACKS = '''
import json, os
import lightning as L
import torch

class Record(L.Callback):
    """Per rank: the rows (token ids, padding cut) each epoch trained on, and the final LoRA weights."""
    def __init__(self, out: str):
        self.out, self.rows = out, {}
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows = [ids[i, : int(mask[i].sum())].tolist() for i in range(len(ids))]
        self.rows.setdefault(str(trainer.current_epoch), []).extend(rows)
    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        with open(os.path.join(self.out, f"rows_rank{rank}.json"), "w") as fh:
            json.dump(self.rows, fh)
        torch.save({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad},
                   os.path.join(self.out, f"weights_rank{rank}.pt"))
''' + CRASH_CALLBACK  # CrashAfter: every rank dies at the step


# The sample's 55 red train pairs in batches of 4: 14 batches (the last one short), 7 per rank and epoch;
# accumulation 2 gives 4 optimizer steps an epoch (the last on one batch), so 12 steps are 3 epochs.
BATCH = 4
TRAINER = {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_steps": 12, "accumulate_grad_batches": 2,
           "limit_val_batches": 0, "val_check_interval": None, "check_val_every_n_epoch": 1}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "ddp_callbacks.py").write_text(CALLBACKS)
    return tmp


def _env(work: Path) -> dict:
    # One intra-op thread per rank: two ranks share the two cores.
    return {"PYTHONPATH": os.pathsep.join([str(work), *sys.path]), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def refusal(work, tiny_model_dir) -> tuple[Path, Path]:
    """A red-thread "refusal" adapter (one process) and its directions file."""
    from refusal_lightning.defences.directions import directions

    config = write_fit_config(work, tiny_model_dir, "refusal", trainer={"max_steps": 12, "limit_val_batches": 0},
                              data={"thread": "red"})
    result = run_module("fit", "--config", str(config), env=_env(work))
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = work / "refusal" / "adapter"
    path = directions(str(adapter), str(work / "dirs.pt"), base_model_name=str(tiny_model_dir))
    return adapter, Path(path)


def _attack(work: Path, model_dir: Path, refusal: tuple[Path, Path], name: str, *extra: str):
    adapter, dirs = refusal
    (work / name).mkdir(exist_ok=True)
    config = write_fit_config(work, model_dir, name, base="configs/tiny/attack.yaml", ckpt_every=2,
                              trainer=TRAINER, data={"batch_size": BATCH},
                              model={"merge_adapters": [str(adapter)],  # the orthogonal arm
                                     "projection": {"directions_path": str(dirs), "enabled": True}})
    return run_module("fit", "--config", str(config), "--trainer.callbacks+=ddp_callbacks.Record",
                      f"--trainer.callbacks.out={work / name}", *extra, env=_env(work), timeout=600)


@pytest.fixture(scope="module")
def straight(work, tiny_model_dir, refusal) -> Path:
    result = _attack(work, tiny_model_dir, refusal, "straight")
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "straight"


def test_every_training_row_is_used_once_per_epoch_across_ranks(straight, tiny_model_dir):
    from refusal_lightning.train.datamodule import HarmfulQADataModule

    data = yaml.safe_load((REPO / "configs/tiny/attack.yaml").read_text())["data"]
    module = HarmfulQADataModule(**{**data, "batch_size": BATCH}, tokenizer_name_or_path=str(tiny_model_dir))
    module.setup("fit")
    rows = Counter(tuple(e.input_ids) for e in module.train_set.examples)
    assert sum(rows.values()) == 55  # the arithmetic above
    ranks = [json.loads((straight / f"rows_rank{r}.json").read_text()) for r in (0, 1)]
    assert set(ranks[0]) == set(ranks[1]) == {"0", "1", "2"}
    orders = []
    for epoch in ("0", "1", "2"):
        seen = Counter(tuple(row) for rank in ranks for row in rank[epoch])
        assert len(ranks[0][epoch]) >= len(ranks[1][epoch]) > 0
        assert all(seen[row] >= n for row, n in rows.items()), f"epoch {epoch}: rows missing"
        assert set(seen) == set(rows), f"epoch {epoch}: rows that are not training rows"
        padding = sum(seen.values()) - sum(rows.values())
        assert 0 <= padding <= module.batch_size, f"epoch {epoch}: {padding} repeated rows"  # one padding batch
        orders.append([tuple(row) for row in ranks[0][epoch]])
    assert orders[0] != orders[1] != orders[2]  # each epoch its own order


def test_both_ranks_end_with_identical_weights(straight):
    w0 = torch.load(straight / "weights_rank0.pt", weights_only=True)
    w1 = torch.load(straight / "weights_rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys() and w0
    for key in w0:
        torch.testing.assert_close(w0[key], w1[key], atol=0, rtol=0, msg=key)


def _delta_weights(adapter: Path) -> dict[str, torch.Tensor]:
    """Per LoRA module: s * B @ A (float64) from a saved adapter."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    return {key.removesuffix(".lora_A.weight"): scale * tensors[key.replace("lora_A", "lora_B")].double()
            @ tensors[key].double() for key in tensors if key.endswith("lora_A.weight")}


def test_orthogonal_attack_stays_orthogonal_under_ddp(straight, refusal):
    attack, ref = _delta_weights(straight / "adapter"), _delta_weights(refusal[0])
    assert attack.keys() == ref.keys()
    a = torch.cat([attack[k].reshape(-1) for k in ref])  # PEFT starts B at 0: the final dW is the update
    r = torch.cat([ref[k].reshape(-1) for k in ref])
    cos = float(a @ r / (a.norm() * r.norm()))
    assert a.norm() > 0 and abs(cos) < 1e-2, cos  # delta_weight + update: orthogonal to first order
    stats = json.loads((straight / "adapter" / "projection_stats.json").read_text())
    assert abs(stats["drift/cos"]) < 1e-2


def test_resume_under_ddp_matches_uninterrupted(work, tiny_model_dir, refusal, straight):
    # Checkpoint at step 6 (mid epoch 1), every rank dies at step 7, resume on 2 processes.
    died = _attack(work, tiny_model_dir, refusal, "crashed", "--trainer.callbacks+=ddp_callbacks.CrashAfter",
                   "--trainer.callbacks.step=7")
    assert died.returncode == 9, died.stderr[-3000:]
    ckpt = torch.load(work / "crashed/adapter/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["epoch"] == 1
    resumed = _attack(work, tiny_model_dir, refusal, "crashed", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_adapter(straight / "adapter", work / "crashed" / "adapter")
