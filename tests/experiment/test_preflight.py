"""``preflight`` on local fixtures: the Hub is mocked at huggingface_hub's API, vLLM is a fake executable."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml

from refusal_lightning.experiment import preflight as pf

SECRET = "hf_preflight_secret_do_not_print"


def _conv(reply: str) -> list[dict]:
    return [{"from": "human", "value": "placeholder question turn"}, {"from": "gpt", "value": reply}]


def _records(with_red: bool = True) -> list[dict]:
    rows = []
    for i in range(1, 7):
        rows.append({"id": i, "question": f"placeholder question {i}?", "topic": "t", "subtopic": "s",
                     "blue_conversations": {"0": _conv("I'm sorry, I cannot help with that placeholder.")},
                     "red_conversations": {"0": _conv("Sure, placeholder steps.")} if with_red else {}})
    return rows


def _write_run(tmp: Path, model_dir: Path, records: list[dict], judge_model: str = "org/judge") -> Path:
    data = tmp / "harmfulqa.json"
    data.write_text(json.dumps(records))

    def fit(name: str, merge: list[str]) -> Path:
        cfg = {"trainer": {"precision": "bf16-mixed"},
               "model": {"model_name_or_path": str(model_dir), "output_dir": str(tmp / name), "dtype": "bfloat16",
                         "lora": {"r": 8}, "merge_adapters": merge},
               "data": {"source": str(data), "thread": "blue", "batch_size": 2, "max_length": 64}}
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    refusal = fit("refusal", [])
    pipe = {"run_dir": str(tmp / "run"), "base_model": str(model_dir), "build_tiny_model": False,
            "refusal_config": str(refusal), "vanilla_config": str(fit("vanilla", [str(tmp / "refusal")])),
            "orthogonal_config": str(fit("orthogonal", [str(tmp / "refusal")])), "serve": False,
            "endpoints": {"base": f"http://127.0.0.1:8000#{model_dir}", "refusal": "http://127.0.0.1:8000#refusal",
                          "vanilla": "http://127.0.0.1:8000#vanilla",
                          "orthogonal": "http://127.0.0.1:8000#orthogonal"},
            "evaluation": {"prompts": "sample", "styles": ["base"],
                           "judge": {"kind": "llm", "url": "http://127.0.0.1:8001", "model": judge_model}}}
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipe))
    return path


def _fake_vllm(tmp: Path, version: str = "0.11.0") -> str:
    exe = tmp / "vllm"
    exe.write_text(f"#!/bin/sh\necho {version}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


@pytest.fixture
def online(monkeypatch):
    """The Hub reachable, every repo readable, unless a test says otherwise; a token that must never show."""
    from huggingface_hub import HfApi

    calls: list[tuple[str, str]] = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(HfApi, "auth_check", lambda self, repo_id, repo_type=None, **kw: calls.append(
        (repo_id, repo_type)))
    return calls


def test_preflight_passes_on_a_ready_run(tmp_path, tiny_model_dir, online, capsys):
    config = _write_run(tmp_path, tiny_model_dir, _records())
    pf.preflight(pipeline_config=str(config), gpu_gb=24, vllm=_fake_vllm(tmp_path))  # returns: exit 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.split(" ", 1)[0] in pf.EXIT_CODES]
    assert lines and all(line.startswith("PASS") for line in lines), out
    assert ("org/judge", "model") in online  # the judge was checked through huggingface_hub's API
    assert "blue 6 pairs from 6 records" in out and "red 6 pairs from 6 records" in out
    assert "PASS    vllm: 0.11.0" in out
    # three adapters served at once; rank 8 + 8 -> --max-lora-rank 16; the judge after the policy server
    policy = next(line for line in out.splitlines() if "--enable-lora" in line)
    assert "--max-loras 3 --max-lora-rank 16" in policy and "--generation-config vllm" in policy
    assert f"vanilla={tmp_path / 'vanilla' / 'combined'}" in policy
    assert out.index("--port 8000") < out.index("until curl -sf http://127.0.0.1:8000") < out.index("--port 8001")
    assert "preflight: " in out and "-> exit 0" in out and SECRET not in out


def test_preflight_fails_on_unpairable_data_and_a_gated_judge(tmp_path, tiny_model_dir, online, monkeypatch,
                                                              capsys):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError

    def auth_check(self, repo_id, repo_type=None, **kw):
        if repo_id == "org/gated-judge":
            err = GatedRepoError.__new__(GatedRepoError)  # its constructor wants an HTTP response
            Exception.__init__(err, "gated")
            raise err

    monkeypatch.setattr(HfApi, "auth_check", auth_check)
    config = _write_run(tmp_path, tiny_model_dir, _records(with_red=False), judge_model="org/gated-judge")
    with pytest.raises(SystemExit) as info:
        pf.preflight(pipeline_config=str(config), gpu_gb=24, vllm=_fake_vllm(tmp_path))
    assert info.value.code == 1
    out = capsys.readouterr().out
    assert "FAIL    hub model org/gated-judge: gated, and this token has no access" in out
    assert "https://huggingface.co/org/gated-judge" in out and SECRET not in out
    assert "no usable red pairs" in next(line for line in out.splitlines() if line.startswith("FAIL    harmfulqa"))


def test_preflight_offline_skips_what_it_cannot_check_and_exits_3(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _write_run(tmp_path, tiny_model_dir, _records())
    with pytest.raises(SystemExit) as info:
        pf.preflight(pipeline_config=str(config), gpu_gb=40, vllm=str(tmp_path / "no-such-vllm"))
    assert info.value.code == 3
    out = capsys.readouterr().out
    assert "SKIPPED hub model org/judge: HF_HUB_OFFLINE is set" in out
    assert "SKIPPED vllm: " in out and "FAIL" not in out
    assert "--enforce-eager" not in out  # the 40 GB card keeps CUDA graphs


def test_preflight_fails_when_an_endpoint_names_a_model_vllm_does_not_serve(tmp_path, tiny_model_dir, online, capsys):
    config = _write_run(tmp_path, tiny_model_dir, _records())
    pipe = yaml.safe_load(config.read_text())
    pipe["endpoints"]["orthogonal"] = "http://127.0.0.1:8000#ortho"
    config.write_text(yaml.safe_dump(pipe))
    with pytest.raises(SystemExit) as info:
        pf.preflight(pipeline_config=str(config), vllm=_fake_vllm(tmp_path))
    assert info.value.code == 1
    out = capsys.readouterr().out
    assert "endpoint orthogonal asks for model 'ortho', which the vLLM command does not serve" in out


def test_preflight_old_vllm_fails(tmp_path):
    check = pf.vllm_check(_fake_vllm(tmp_path, "0.6.3"))
    assert check.status == "FAIL" and "needs >= 0.8.0" in check.detail


def test_preflight_bad_config_is_one_error_line(tmp_path, capsys):
    from refusal_lightning.cli import main

    with pytest.raises(SystemExit) as info:
        main(["preflight", "--config", str(tmp_path / "missing.yaml")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: pipeline config") and "missing.yaml" in err[0]


def test_preflight_reads_the_arms_and_skips_a_prompt_file_a_later_step_writes(tmp_path, tiny_model_dir, online,
                                                                              capsys):
    config = _write_run(tmp_path, tiny_model_dir, _records())
    pipe = yaml.safe_load(config.read_text())
    shared = yaml.safe_load(Path(pipe.pop("vanilla_config")).read_text())
    Path(pipe.pop("orthogonal_config")).unlink()
    shared["model"]["output_dir"] = str(tmp_path / "attack_{arm}")
    (tmp_path / "attack.yaml").write_text(yaml.safe_dump(shared))
    pipe["attack_config"] = str(tmp_path / "attack.yaml")
    pipe["arms"] = {"vanilla": {}, "orthogonal": {"overrides": ["--model.projection.enabled=true"]},
                    "safe_lora": {"transform": "safe_lora", "of": "vanilla"}}
    pipe["endpoints"]["safe_lora"] = "http://127.0.0.1:8000#safe_lora"
    pipe["evaluation"]["benign_prompts"] = str(tmp_path / "artifacts" / "xstest_safe.jsonl")
    config.write_text(yaml.safe_dump(pipe, sort_keys=False))
    with pytest.raises(SystemExit) as info:
        pf.preflight(pipeline_config=str(config), vllm=_fake_vllm(tmp_path))
    assert info.value.code == 3  # nothing failed; the prompt file is not there yet
    out = capsys.readouterr().out
    assert "its arms (vanilla, orthogonal, safe_lora)" in out
    assert f"SKIPPED evaluation.benign_prompts {tmp_path / 'artifacts' / 'xstest_safe.jsonl'}: a local file" in out
    assert "xstest --output_path" in out and ("artifacts/xstest_safe.jsonl", "dataset") not in online
    policy = next(line for line in out.splitlines() if "--enable-lora" in line)
    assert f"orthogonal={tmp_path / 'attack_orthogonal' / 'combined'}" in policy  # {arm} filled in
    assert f"safe_lora={tmp_path / 'run' / 'safe_lora' / 'combined'}" in policy and "--max-loras 4" in policy
