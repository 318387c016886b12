"""push / model cards: the Hub is stubbed at the HfApi boundary and sockets are blocked; nothing is sent."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from huggingface_hub import RepoUrl

from refusal_lightning.hub import push as hub
from refusal_lightning.hub.push import HubPushError, PushValidationError, push, repo_name_problems

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "push_to_hf.py"
SENTINEL = "hf_SENTINELtoken_9f3c1e7a"  # unique, so any leak is found by a plain substring search

ADAPTER_CONFIG = {
    "base_model_name_or_path": "Qwen/Qwen3-0.6B",
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "bias": "none",
}
WEIGHTS_BYTES = 5000


def _config_yaml(thread: str, projection: bool) -> str:
    return (
        "seed_everything: 1234\n"
        "trainer:\n  max_steps: 300\n  accumulate_grad_batches: 4\n  precision: bf16-mixed\n"
        "model:\n  class_path: refusal_lightning.train.module.RefusalLoRAModule\n  init_args:\n"
        "    model_name_or_path: Qwen/Qwen3-0.6B\n    lr: 0.0002\n"
        f"    projection:\n      enabled: {str(projection).lower()}\n"
        "      mode: delta_weight\n      target: grad\n"
        f"data:\n  source: declare-lab/HarmfulQA\n  thread: {thread}\n  batch_size: 8\n"
    )


def make_adapter(
    root: Path,
    dirname: str,
    *,
    thread: str | None = "blue",
    projection: bool = False,
    stats: bool = True,
    readme: str | None = None,
    base: str = "Qwen/Qwen3-0.6B",
) -> Path:
    """A fake PEFT adapter dir: real-looking config and stats files, a few bytes of 'weights'."""
    path = root / dirname
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"\0" * WEIGHTS_BYTES)
    (path / "adapter_config.json").write_text(json.dumps({**ADAPTER_CONFIG, "base_model_name_or_path": base}))
    if thread is not None:
        (path / "config.yaml").write_text(_config_yaml(thread, projection))
    if stats:
        (path / "data_stats.json").write_text(
            json.dumps(
                {
                    "records_read": 1960,
                    "skipped": {"no_gpt_turn": 12, "empty_reply": 3},
                    "pairs": 8871,
                    "selection_rule": "highest refusal-marker score, ties by length",
                }
            )
        )
    if projection:
        (path / "projection_stats.json").write_text(
            json.dumps({"mode": "delta_weight", "target": "grad", "removed_frac": 0.0421, "drift_cos": 7e-4})
        )
    if readme is not None:
        (path / "README.md").write_text(readme)
    (path / "checkpoints").mkdir()
    (path / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    (path / ".cache").mkdir()
    (path / ".cache" / "junk").write_text("x")
    return path


def snapshot(path: Path) -> dict[str, tuple[int, bytes]]:
    return {
        p.relative_to(path).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


class FakeHfApi:
    """Records every call; keeps repos and their files in memory like the Hub would."""

    instances: list[FakeHfApi] = []
    repos: dict[str, dict[str, Any]] = {}

    def __init__(self, token: str | None = None, **kwargs: Any) -> None:
        self.token = token
        self.kwargs = kwargs
        self.calls: list[tuple[str, dict[str, Any]]] = []
        FakeHfApi.instances.append(self)

    def whoami(self, token: Any = None, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("whoami", {}))
        return {"type": "user", "name": "alice"}

    def create_repo(self, repo_id: str, **kwargs: Any) -> RepoUrl:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if repo_id in FakeHfApi.repos and not kwargs.get("exist_ok"):
            raise RuntimeError(f"409 Conflict: {repo_id} already exists")
        FakeHfApi.repos.setdefault(repo_id, {"private": kwargs.get("private"), "files": {}, "commits": 0})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id: str, operations: Any, **kwargs: Any) -> SimpleNamespace:
        operations = list(operations)
        self.calls.append(("create_commit", {"repo_id": repo_id, "operations": operations, **kwargs}))
        repo = FakeHfApi.repos[repo_id]
        for op in operations:
            src = op.path_or_fileobj
            repo["files"][op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
        repo["commits"] += 1
        return SimpleNamespace(oid="0" * 40, commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    def __getattr__(self, name: str) -> Any:  # any other HfApi method is a test failure
        raise AssertionError(f"unexpected HfApi.{name}")

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class NoApi:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("HfApi must not be constructed here")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No socket connects, no real token, a fresh fake Hub per test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    FakeHfApi.instances = []
    FakeHfApi.repos = {}


@pytest.fixture
def adapters(tmp_path: Path) -> dict[str, Path]:
    return {
        "refusal": make_adapter(tmp_path, "refusal_lora", thread="blue"),
        "vanilla": make_adapter(tmp_path, "vanilla_lora", thread="red"),
        "orthogonal": make_adapter(tmp_path, "orth_lora", thread="red", projection=True),
    }


def specs(adapters: dict[str, Path]) -> list[str]:
    return [f"{name}={path}" for name, path in adapters.items()]


# --- dry run ------------------------------------------------------------------------------------------


def test_dry_run_prints_repo_ids_files_and_sizes_without_any_call(
    adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(hub, "HfApi", NoApi)
    monkeypatch.setattr(hub, "get_token", lambda: pytest.fail("a dry run must not look up the login"))
    before = {name: snapshot(path) for name, path in adapters.items()}

    result = push(specs(adapters), namespace="my-org", repo_template="qwen3-{name}-lora", dry_run=True)

    out = capsys.readouterr().out
    assert result == {name: f"my-org/qwen3-{name}-lora" for name in adapters}
    for name, path in adapters.items():
        assert f"{name}: {path} -> my-org/qwen3-{name}-lora" in out
    for filename in ("adapter_config.json", "config.yaml", "data_stats.json", "projection_stats.json"):
        assert filename in out
    assert f"adapter_model.safetensors  {WEIGHTS_BYTES:>13,} B  (4.9 KiB)" in out
    assert "README.md" in out and "[generated model card]" in out
    assert "skipped checkpoints/last.ckpt: Lightning checkpoint" in out
    assert "skipped .cache/" in out
    assert "Dry run: 3 adapters" in out
    assert {name: snapshot(path) for name, path in adapters.items()} == before


def test_dry_run_without_namespace_needs_no_token_or_whoami(
    adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(hub, "HfApi", NoApi)
    result = push(specs(adapters), dry_run=True)
    assert result["refusal"] == f"{hub.NAMESPACE_PLACEHOLDER}/refusal"
    assert hub.NAMESPACE_PLACEHOLDER in capsys.readouterr().out


# --- validation ---------------------------------------------------------------------------------------


def test_every_problem_is_reported_at_once_before_any_upload(tmp_path: Path) -> None:
    good = make_adapter(tmp_path, "good")
    no_weights = make_adapter(tmp_path, "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    no_config = make_adapter(tmp_path, "no_config")
    (no_config / "adapter_config.json").unlink()
    bad_stats = make_adapter(tmp_path, "bad_stats")
    (bad_stats / "data_stats.json").write_text("{not json")
    adapter = [
        "justaname",
        f"={good}",
        f"good={good}",
        f"good={good}",
        f"missing={tmp_path / 'nope'}",
        f"noweights={no_weights}",
        f"noconfig={no_config}",
        f"badstats={bad_stats}",
        f"-leading={good}",
        f"dou--ble={good}",
        f"sp ace={good}",
        f"{'x' * 97}={good}",
    ]
    with pytest.raises(PushValidationError) as info:
        push(adapter, namespace="bad..ns")
    err = info.value
    assert isinstance(err, ValueError)
    expected = [
        "--adapter 'justaname': expected NAME=PATH",
        f"--adapter '={good}': expected NAME=PATH",
        "adapter name 'good' is given more than once",
        f"missing: {tmp_path / 'nope'} does not exist",
        f"noweights: {no_weights} has no adapter_model.safetensors or adapter_model.bin",
        f"noconfig: {no_config} has no adapter_config.json",
        f"badstats: {bad_stats / 'data_stats.json'}: not valid JSON",
        "-leading: repo name '-leading' is not a valid Hub name",
        "dou--ble: repo name 'dou--ble' is not a valid Hub name (Cannot have -- or ..",
        "sp ace: repo name 'sp ace' is not a valid Hub name",
        f"{'x' * 97}: repo name '{'x' * 97}' is not a valid Hub name",
        "--namespace 'bad..ns' is not a valid Hub name",
        "no Hugging Face token: set the HF_TOKEN environment variable",
    ]
    for text in expected:
        assert any(text in problem for problem in err.problems), text
    assert len(err.problems) == len(expected)
    assert str(err).startswith(f"cannot push ({len(expected)} problems):")
    assert all(f"  - {problem}" in str(err) for problem in err.problems)
    assert FakeHfApi.instances == []


def test_duplicate_repo_ids_from_the_template_are_rejected(adapters: dict[str, Path]) -> None:
    with pytest.raises(PushValidationError) as info:
        push(specs(adapters), namespace="me", repo_template="same-repo", dry_run=True)
    assert info.value.problems == [
        "vanilla: repo name 'same-repo' is also the repo of adapter 'refusal'",
        "orthogonal: repo name 'same-repo' is also the repo of adapter 'refusal'",
    ]


def test_template_problems(adapters: dict[str, Path]) -> None:
    with pytest.raises(PushValidationError, match=r"--repo_template '\{model\}-\{name\}'"):
        push(specs(adapters), namespace="me", repo_template="{model}-{name}", dry_run=True)
    with pytest.raises(PushValidationError, match="contains '/'; give the owner with --namespace"):
        push(specs(adapters)[:1], namespace="me", repo_template="org/{name}", dry_run=True)


def test_no_adapters_is_a_problem() -> None:
    with pytest.raises(PushValidationError, match="no adapters given"):
        push([], dry_run=True)


def test_repo_names_follow_the_hubs_rules() -> None:
    # The rules are huggingface_hub's validate_repo_id; ours add that a name has no owner part.
    assert repo_name_problems("qwen3-0.6B_refusal.v2") == [] and repo_name_problems("x" * 96) == []
    assert repo_name_problems("a/b") == ["contains '/'"]
    for bad in ("", "x" * 97, "a--b", "-a", "réfusal", "model.git"):
        assert repo_name_problems(bad), bad


# --- real push (fake Hub) ------------------------------------------------------------------------------


def test_push_creates_repos_and_uploads_files_and_card_in_one_commit(
    adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    before = {name: snapshot(path) for name, path in adapters.items()}

    result = push(specs(adapters), namespace="my-org", repo_template="{name}-lora", private=True)

    assert result == {name: f"my-org/{name}-lora" for name in adapters}
    (api,) = FakeHfApi.instances
    assert api.token == SENTINEL and api.kwargs["library_name"] == "refusal_lightning"
    assert api.names() == ["create_repo", "create_commit"] * 3
    creates = [kwargs for name, kwargs in api.calls if name == "create_repo"]
    assert creates == [
        {"repo_id": f"my-org/{name}-lora", "private": True, "exist_ok": True, "repo_type": "model"}
        for name in adapters
    ]
    for name, path in adapters.items():
        files = FakeHfApi.repos[f"my-org/{name}-lora"]["files"]
        expected = {p.name for p in path.iterdir() if p.is_file()} | {"README.md"}
        assert set(files) == expected  # no checkpoints/, no hidden folders
        assert files["adapter_model.safetensors"] == b"\0" * WEIGHTS_BYTES
        assert files["README.md"].startswith(b"---\nbase_model: Qwen/Qwen3-0.6B\n")
    commits = [kwargs for name, kwargs in api.calls if name == "create_commit"]
    assert all(c["commit_message"] == hub.DEFAULT_COMMIT_MESSAGE for c in commits)
    out = capsys.readouterr().out
    for name in adapters:
        assert f"https://huggingface.co/my-org/{name}-lora" in out
    assert "Pushed 3 adapters:" in out
    assert {name: snapshot(path) for name, path in adapters.items()} == before


def test_rerun_updates_the_same_repos(adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    first = push(specs(adapters), namespace="my-org")
    (adapters["refusal"] / "data_stats.json").write_text(json.dumps({"records_read": 7}))
    second = push(specs(adapters), namespace="my-org", commit_message="second pass")

    assert first == second
    assert sorted(FakeHfApi.repos) == sorted(first.values())
    assert all(repo["commits"] == 2 for repo in FakeHfApi.repos.values())
    assert b"**records_read**: 7" in FakeHfApi.repos["my-org/refusal"]["files"]["README.md"]
    second_calls = FakeHfApi.instances[1].calls
    assert all(kwargs["exist_ok"] for name, kwargs in second_calls if name == "create_repo")
    assert {kwargs["commit_message"] for name, kwargs in second_calls if name == "create_commit"} == {
        "second pass"
    }


def test_namespace_defaults_to_whoami(adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    result = push(specs(adapters)[:1])
    assert result == {"refusal": "alice/refusal"}
    assert FakeHfApi.instances[0].names() == ["whoami", "create_repo", "create_commit"]


def test_token_from_cached_login_and_custom_env_var(
    adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub, "get_token", lambda: "cached-login-token")
    push(specs(adapters)[:1], namespace="me")
    monkeypatch.setenv("MY_HUB_TOKEN", "env-token")
    push(specs(adapters)[:1], namespace="me", token_env="MY_HUB_TOKEN")
    assert [api.token for api in FakeHfApi.instances] == ["cached-login-token", "env-token"]


def test_missing_token_is_one_clear_error(adapters: dict[str, Path]) -> None:
    with pytest.raises(PushValidationError) as info:
        push(specs(adapters), namespace="me", token_env="MY_HUB_TOKEN")
    assert info.value.problems == [
        "no Hugging Face token: set the MY_HUB_TOKEN environment variable or run `hf auth login` "
        "(a dry run needs no token)"
    ]
    assert FakeHfApi.instances == []


def test_upload_failure_names_what_was_pushed(
    adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    original = FakeHfApi.create_commit

    def fail_second(self: FakeHfApi, repo_id: str, operations: Any, **kwargs: Any) -> SimpleNamespace:
        if repo_id.endswith("vanilla"):
            raise RuntimeError("500 Server Error")
        return original(self, repo_id, operations, **kwargs)

    monkeypatch.setattr(FakeHfApi, "create_commit", fail_second)
    with pytest.raises(HubPushError) as info:
        push(specs(adapters), namespace="me")
    message = str(info.value)
    assert "vanilla: upload to me/vanilla failed: RuntimeError: 500 Server Error" in message
    assert "already pushed: me/refusal" in message
    assert "me/orthogonal" not in FakeHfApi.repos


# --- the card in a push (its content: test_model_card.py) ---------------------------------------------


def test_user_readme_is_kept_and_peft_placeholder_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    mine = make_adapter(tmp_path, "mine", readme="# My own card\n")
    peft_placeholder = (
        "---\nlibrary_name: peft\n---\n# Model Card for Model ID\n- **x:** [More Information Needed]\n"
    )
    peft = make_adapter(tmp_path, "peft", readme=peft_placeholder)
    push([f"mine={mine}", f"peft={peft}"], namespace="me")
    assert FakeHfApi.repos["me/mine"]["files"]["README.md"] == b"# My own card\n"
    generated = FakeHfApi.repos["me/peft"]["files"]["README.md"].decode()
    assert "Model Card for Model ID" not in generated and "**refusal adapter**" in generated
    assert (peft / "README.md").read_text() == peft_placeholder


def test_bad_eval_summary_is_a_validation_problem(adapters: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "summary.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(PushValidationError, match=r"--eval_summary .*expected \{\"endpoints\""):
        push(specs(adapters), dry_run=True, eval_summary=str(bad))
    with pytest.raises(PushValidationError, match="file not found"):
        push(specs(adapters), dry_run=True, eval_summary=str(tmp_path / "missing.json"))
    # an older summary pooled the prompt sets into one rate per endpoint: not shown as if it were per set
    bad.write_text(json.dumps({"endpoints": {"orthogonal": {"n": 10, "refusal_rate": 0.5}}}))
    with pytest.raises(PushValidationError, match=r"orthogonal have no per-prompt-set rates.*rerun evaluate"):
        push(specs(adapters), dry_run=True, eval_summary=str(bad))


# --- the token ----------------------------------------------------------------------------------------


def test_token_never_printed_logged_or_written(
    adapters: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    errors: list[str] = []

    push(specs(adapters), dry_run=True)
    push(specs(adapters), namespace="me", private=True)
    push(specs(adapters))  # whoami path
    with pytest.raises(PushValidationError) as bad:
        push([*specs(adapters), "broken", f"x={tmp_path / 'nope'}"], namespace="me")
    errors.append(str(bad.value))

    def leaky(self: FakeHfApi, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"401 Unauthorized for Authorization: Bearer {self.token}")

    monkeypatch.setattr(FakeHfApi, "create_repo", leaky)
    with pytest.raises(HubPushError) as upload_failure:
        push(specs(adapters), namespace="me")
    errors.append(str(upload_failure.value))
    monkeypatch.setattr(FakeHfApi, "whoami", leaky)
    with pytest.raises(HubPushError) as whoami_failure:
        push(specs(adapters))
    errors.append(str(whoami_failure.value))
    assert "***" in errors[-1] and "***" in errors[-2]

    captured = capsys.readouterr()
    uploaded = b"".join(data for repo in FakeHfApi.repos.values() for data in repo["files"].values())
    on_disk = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert FakeHfApi.repos and uploaded
    for text in (captured.out, captured.err, caplog.text, *errors):
        assert SENTINEL not in text
    assert SENTINEL.encode() not in uploaded and SENTINEL.encode() not in on_disk


def test_a_file_holding_the_token_is_refused(
    adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    config = adapters["vanilla"] / "config.yaml"
    config.write_text(config.read_text() + f"hub_token: {SENTINEL}\n")
    for dry_run in (True, False):
        with pytest.raises(PushValidationError) as info:
            push(specs(adapters), namespace="me", dry_run=dry_run)
        assert info.value.problems == [
            "vanilla: config.yaml contains your Hub token; remove it first",
            "vanilla: README.md contains your Hub token; remove it first",
        ]
        assert SENTINEL not in str(info.value)
    assert FakeHfApi.instances == []


# --- the script -------------------------------------------------------------------------------------------


def test_cli_expands_documented_short_forms() -> None:
    from refusal_lightning.cli import _param_kinds, expand_shorthands

    def expand(args: list[str]) -> list[str]:
        return expand_shorthands(args, *_param_kinds(push))

    assert expand(["--adapter", "a=x", "--adapter=b=y", "--private", "--dry_run"]) == [
        "--adapter+", "a=x", "--adapter+=b=y", "--private", "true", "--dry_run", "true",
    ]  # fmt: skip
    assert expand(["--adapter", "[a=x, b=y]", "--dry_run", "false", "--private", "--namespace", "me"]) == [
        "--adapter", "[a=x, b=y]", "--dry_run", "false", "--private", "true", "--namespace", "me",
    ]  # fmt: skip


def _run_script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_TOKEN": SENTINEL, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT
    )


def test_script_help() -> None:
    result = _run_script("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--adapter", "--namespace", "--repo_template", "--private", "--dry_run", "--eval_summary"):
        assert option in result.stdout
    assert "Upload LoRA adapter dirs to the Hugging Face Hub" in result.stdout


def test_script_dry_run_and_error(adapters: dict[str, Path], tmp_path: Path) -> None:
    args = [arg for spec in specs(adapters) for arg in ("--adapter", spec)]
    result = _run_script(*args, "--namespace", "my-org", "--repo_template", "qwen3-{name}", "--dry_run")
    assert result.returncode == 0, result.stderr
    for name in adapters:
        assert f"-> my-org/qwen3-{name}" in result.stdout
    assert "adapter_model.safetensors" in result.stdout and "Dry run: 3 adapters" in result.stdout

    failed = _run_script("--adapter", f"x={tmp_path / 'nope'}", "--adapter", "bad", "--dry_run")
    assert failed.returncode == 2
    assert failed.stderr.startswith("error: cannot push (2 problems):") and "Traceback" not in failed.stderr
    for output in (result.stdout, result.stderr, failed.stdout, failed.stderr):
        assert SENTINEL not in output
