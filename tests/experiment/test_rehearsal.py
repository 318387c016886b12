"""A rehearsal of the real run (issue 20): ``configs/pipeline.yaml`` and the real fit configs end to end, offline.

Only what cannot run here is swapped, each by one override: the model (the tiny Qwen3 instead of
Qwen/Qwen3-0.6B), the data (``tests/fixtures/harmfulqa_shaped.json``: string and int ids, duplicate
questions, multi-turn conversations, ``None`` entries), the prompts (a SORRY-Bench-schema file and XSTest's
columns in a local CSV, turned into ``artifacts/xstest_safe.jsonl`` by the ``xstest`` command as the README
says), the endpoints (our ``serve`` with the adapters vLLM would get, under the same names), the judge (the
stub server playing SORRY-Bench's judge), ``max_steps`` and ``val_check_interval``. Everything else, including
bf16-mixed, the bf16 base, accumulation, two dataloader workers, TensorBoard and checkpoints, is the real
YAML's. It follows the README's sequence: fits with ``--until orthogonal``, then the servers, then the rest.

Marked slow: the real ``max_tokens: 1024`` makes four 1024-step generations on our HF-generate server (the
tiny random model never stops early); 17.6 min here on 2 cores shared with other jobs. ``make test-slow``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import REPO

from refusal_lightning.cli import main
from refusal_lightning.evaluation.stub_server import StubConfig
from refusal_lightning.serving.process import ServerProcess
from refusal_lightning.train.harmfulqa import split_records

FIXTURE = REPO / "tests" / "fixtures" / "harmfulqa_shaped.json"
SORRY_ROWS = [{"question_id": i, "category": str(i), "turns": [f"Placeholder SORRY-Bench-style request {i}."],
               "prompt_style": "base"} for i in (1, 2, 3)]
XSTEST_CSV = ("id,prompt,type,label,focus,note\n"
              "1,How do I end a stuck placeholder process?,homonyms,safe,end,\n"
              "2,Placeholder unsafe contrast prompt.,contrast_homonyms,unsafe,end,\n"
              "3,Where can I shoot a placeholder photo?,homonyms,safe,shoot,\n")
MODELS = ("base", "refusal", "vanilla", "orthogonal")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, tiny_model_dir):
    from refusal_lightning.evaluation.stub_server import start_stub

    tmp = tmp_path_factory.mktemp("rehearsal")
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)  # the real configs write under ./artifacts
    data = tmp / "data_for_hub.json"
    shutil.copy(FIXTURE, data)
    (tmp / "sorry.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SORRY_ROWS))
    (tmp / "xstest_prompts.csv").write_text(XSTEST_CSV)
    main(["xstest", "--source", "xstest_prompts.csv", "--output_path", "artifacts/xstest_safe.jsonl"])

    judge, judge_url, judge_log = start_stub(StubConfig(models=["sorry-bench-judge"]))
    real = yaml.safe_load((REPO / "configs/pipeline.yaml").read_text())
    config = {**real, "base_model": str(tiny_model_dir), "build_tiny_model": False,
              **{k: str(REPO / real[k]) for k in ("refusal_config", "attack_config")},
              "fit_overrides": [f"--data.source={data}", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                                "--trainer.enable_progress_bar=false"]}
    config["evaluation"] = {**real["evaluation"], "prompts": "sorry.jsonl",
                            "judge": {**real["evaluation"]["judge"], "url": judge_url}}
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # the arms' order is the table's
    main(["pipeline", "--config", str(path), "--until", "orthogonal"])  # the fits, then start the servers

    run = tmp / "artifacts"
    adapters = {"refusal": run / "refusal_lora", "vanilla": run / "attack_vanilla" / "combined",
                "orthogonal": run / "attack_orthogonal" / "combined"}  # as the README's --lora-modules
    with ServerProcess(str(tiny_model_dir), adapters, tmp / "serve.log", max_batch_size=32) as server:
        config["endpoints"] = {name: f"{server.url}#{name}" for name in MODELS}
        path.write_text(yaml.safe_dump(config, sort_keys=False))  # the arms' order is the table's
        main(["pipeline", "--config", str(path)])
    yield run, judge_log, config
    judge.shutdown()
    judge.server_close()
    mp.undo()


def test_rehearsal_trains_on_the_real_data_path(rehearsal):
    run, _, _ = rehearsal
    split = split_records(json.loads(FIXTURE.read_text()), 0.1, 0)
    for folder, thread in (("refusal_lora", "blue"), ("attack_vanilla", "red"), ("attack_orthogonal", "red")):
        stats = json.loads((run / folder / "data_stats.json").read_text())
        assert stats["thread"] == thread and stats["prompt"] == "turn", folder
        assert stats["duplicate_questions"] == 3 and stats["skipped_records"].get("wrong_type:id") == 1, folder
        assert stats["val_questions"] == len(split.val) and stats["train_questions"] == len(split.train), folder
        assert stats["skipped_conversations"]["missing"] > 0, folder
        saved = yaml.safe_load((run / folder / "config.yaml").read_text())
        assert saved["trainer"]["precision"] == "bf16-mixed" and saved["trainer"]["accumulate_grad_batches"] == 4
        assert saved["data"]["num_workers"] == 2 and saved["model"]["dtype"] == "bfloat16"
    for attack in ("attack_vanilla", "attack_orthogonal"):
        assert (run / attack / "combined" / "adapter_model.safetensors").is_file()
        assert (run / attack / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "tensorboard").glob("refusal_lora/*/events.out.tfevents.*"))


def test_rehearsal_evaluates_every_model_on_every_prompt_set(rehearsal):
    run, judge_log, _ = rehearsal
    results = json.loads((run / "results.json").read_text())
    heldout = len(split_records(json.loads(FIXTURE.read_text()), 0.1, 0).val)
    assert list(results["models"]) == list(MODELS)
    for name, row in results["models"].items():
        sets = row["prompt_sets"]
        assert {k: v["n"] for k, v in sets.items()} == {"sorry_bench": 3, "harmfulqa_heldout": heldout, "benign": 2}
        assert all(v["errors"] == 0 for v in sets.values()), name
        assert row["nll"]["red_heldout"] > 0 and row["nll"]["blue_heldout"] > 0
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["judge"]["primary"] == "llm" and summary["config"]["generation"]["max_tokens"] == 1024
    # the judge gets SORRY-Bench's literal prompt as a completion (no chat template), every answer once
    judged = [r for r in judge_log.requests if r.get("path", "").endswith("/v1/completions")]
    assert len(judged) == len(MODELS) * (3 + heldout + 2)
    assert not [r for r in judge_log.requests if r.get("path", "").endswith("/chat/completions")]
    assert (run / "results.md").is_file()
