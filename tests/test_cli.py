"""CLI contract: --help for every command, every shipped YAML parses, one clear line per bad input."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_module, write_fit_config

from refusal_lightning.cli import COMMAND_TARGETS, LIGHTNING_COMMANDS, main

CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml"))
FIT_CONFIGS = [c for c in CONFIGS if not Path(c).name.startswith(("pipeline", "sweep"))]


def _exit_code(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code or 0


@pytest.mark.parametrize("command", [*LIGHTNING_COMMANDS, *COMMAND_TARGETS])
def test_help_for_every_command(command, capsys):
    assert _exit_code([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage" in out.lower() and len(out.splitlines()) > 5


def test_top_level_help_lists_commands(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in (*LIGHTNING_COMMANDS, *COMMAND_TARGETS):
        assert command in out


@pytest.mark.parametrize("config", FIT_CONFIGS)
def test_every_fit_yaml_parses(config, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert _exit_code(["fit", "--config", config, "--print_config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["model_name_or_path"] and resolved["data"]["source"]
    assert resolved["data"]["thread"] in ("blue", "red") and resolved["trainer"]["callbacks"]


@pytest.mark.parametrize("config", ["configs/pipeline.yaml", "configs/tiny/pipeline.yaml", "configs/cpu/pipeline.yaml",
                                    "configs/cpu/pipeline_baselines.yaml"])
def test_arms_are_the_shared_attack_plus_a_few_overrides(config):
    pipe = yaml.safe_load((REPO / config).read_text())
    arms = pipe["arms"]
    assert arms["vanilla"] in ({}, None)  # no defence: the shared attack as configured
    assert arms["orthogonal"]["overrides"] == ["--model.projection.enabled=true"]
    for name, arm in arms.items():
        assert "config" not in (arm or {}), f"{name} should use the shared attack_config"
        assert len((arm or {}).get("overrides", [])) <= 3, name
        assert (arm or {}).get("of", "vanilla") == "vanilla", name  # post-hoc defences act on the vanilla attack
    attack = yaml.safe_load((REPO / pipe["attack_config"]).read_text())
    assert attack["model"]["projection"]["enabled"] is False and attack["model"]["projection"]["directions_path"]
    assert "{arm}" in attack["model"]["output_dir"]  # every arm writes its own folder
    assert "{arm}" in attack["trainer"]["callbacks"][0]["init_args"]["dirpath"]
    refusal = yaml.safe_load((REPO / pipe["refusal_config"]).read_text())
    for key in ("r", "alpha"):
        assert refusal["model"]["lora"][key] == attack["model"]["lora"][key], key
    assert refusal["model"]["model_name_or_path"] == attack["model"]["model_name_or_path"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_missing_config_file(capsys, tmp_path):
    assert _exit_code(["fit", "--config", str(tmp_path / "nope.yaml")]) != 0
    assert "nope.yaml" in capsys.readouterr().err


def test_unknown_config_key(capsys, tmp_path, tiny_model_dir):
    config = write_fit_config(tmp_path, tiny_model_dir, model={"bogus_key": 1})
    assert _exit_code(["fit", "--config", str(config)]) != 0
    assert "bogus_key" in capsys.readouterr().err


def test_missing_model_path(capsys, tmp_path, tiny_model_dir):
    config = write_fit_config(tmp_path, tiny_model_dir, model={"model_name_or_path": str(tmp_path / "nope")})
    assert _exit_code(["fit", "--config", str(config)]) == 2
    assert "does not exist" in _one_error_line(capsys)


def test_adapter_dir_without_adapter_config(capsys, tmp_path, tiny_model_dir):
    fake = tmp_path / "not_an_adapter"
    fake.mkdir()
    (fake / "adapter_model.safetensors").write_bytes(b"")
    config = write_fit_config(tmp_path, tiny_model_dir, model={"merge_adapters": [str(fake)]})
    assert _exit_code(["fit", "--config", str(config)]) == 2
    line = _one_error_line(capsys)
    assert "not_an_adapter" in line and "adapter_config.json" in line


def test_data_path_that_does_not_exist(capsys, tmp_path, tiny_model_dir):
    config = write_fit_config(tmp_path, tiny_model_dir, data={"source": str(tmp_path / "missing.json")})
    assert _exit_code(["fit", "--config", str(config)]) == 2
    line = _one_error_line(capsys)
    assert "missing.json" in line and "does not exist" in line


def test_tiny_model_command_is_deterministic(tmp_path):
    for name in ("a", "b"):
        main(["tiny-model", "--output_dir", str(tmp_path / name), "--seed", "3"])
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    main(["tiny-model", "--output_dir", str(tmp_path / "c"), "--seed", "4"])
    assert (tmp_path / "c/model.safetensors").read_bytes() != (tmp_path / "a/model.safetensors").read_bytes()


def test_tiny_model_loads_with_auto_classes(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.num_hidden_layers == 2
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("config", [c for c in CONFIGS if Path(c).name.startswith("pipeline")])
def test_every_pipeline_yaml_parses(config, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert _exit_code(["pipeline", "--config", config, "--print_config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    for key in ("refusal_config", "vanilla_config", "orthogonal_config", "subspace_config", "asft_config"):
        assert resolved.get(key) is None or (REPO / resolved[key]).exists(), resolved[key]
    assert resolved["serve"] or set(resolved["endpoints"]) == {"base", "refusal", "vanilla", "orthogonal"}
    from refusal_lightning.evaluation.runner import evaluate_arguments

    evaluate_arguments(resolved["evaluation"] or {}, config)  # what the pipeline checks before its first stage


def test_pipeline_refuses_two_fits_with_one_output_dir_before_any_stage(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written here
    fixed = tmp_path / "attack_fixed.yaml"  # a shared config without {arm}: every arm would write one folder
    fixed.write_text((REPO / "configs/tiny/attack.yaml").read_text().replace("{arm}", "vanilla"))
    code = _exit_code(["pipeline", "--config", str(REPO / "configs/tiny/pipeline.yaml"),
                       "--refusal_config", str(REPO / "configs/tiny/refusal_lora.yaml"),
                       "--attack_config", str(fixed)])
    assert code == 2
    line = _one_error_line(capsys)
    assert "attack_vanilla of 'orthogonal' is also the output of stage 'vanilla'" in line and "{arm}" in line
    assert [p.name for p in tmp_path.iterdir()] == ["attack_fixed.yaml"]


def test_pipeline_lists_every_problem_of_its_arms_before_any_stage(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    arms = ('{"orthogonal": {"overrides": "--model.projection.enabled=true"}, "base": {}, '
            '"safe": {"transform": "safer_lora", "of": "ortho"}, "extra": {"confg": "x.yaml"}}')
    code = _exit_code(["pipeline", "--config", str(REPO / "configs/tiny/pipeline.yaml"), "--arms", arms])
    assert code == 2
    err = capsys.readouterr().err
    for needle in ("arms.orthogonal.overrides: expected a list", "arms.base: an arm's name",
                   "arms.safe.transform: unknown transform 'safer_lora' (known: safe_lora)",
                   "arms.safe.of: 'ortho' is not a fit arm", "arms.extra: unknown key(s) confg",
                   "a fit arm named 'vanilla'"):
        assert needle in err, err
    assert list(tmp_path.iterdir()) == []


def test_pipeline_refuses_arms_together_with_the_per_row_keys_of_before(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _exit_code(["pipeline", "--config", str(REPO / "configs/tiny/pipeline.yaml"),
                       "--vanilla_config", str(REPO / "configs/tiny/attack.yaml")])
    assert code == 2 and "keep arms only" in _one_error_line(capsys)


def test_per_row_keys_of_before_become_arms_in_table_order():
    from refusal_lightning.experiment.arms import legacy_arms, parse_arms

    arms = parse_arms(legacy_arms("v.yaml", "o.yaml", "s.yaml", "a.yaml", {"threshold": 0.5}), None)
    assert [a.name for a in arms] == ["vanilla", "orthogonal", "subspace", "safe_lora", "asft"]
    assert str(arms[0].config) == "v.yaml" and arms[0].overrides == ()
    assert (arms[3].transform, arms[3].of, dict(arms[3].args)) == ("safe_lora", "vanilla", {"threshold": 0.5})


def test_pipeline_refuses_a_wrong_evaluation_key_before_any_stage(capsys, tmp_path, monkeypatch):
    config = yaml.safe_load((REPO / "configs/tiny/pipeline.yaml").read_text())
    config["run_dir"] = str(tmp_path / "run")
    config["evaluation"]["temperature"] = 0.0  # the flat key of old: it sits under generation now
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    assert _exit_code(["pipeline", "--config", str(path)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: evaluation: Option 'temperature' is not accepted") and "under generation" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.yaml"]  # no stage ran


@pytest.mark.parametrize("judge", [["--judge", "both", "--judge_url", "http://j:1"],
                                   ["--judge=both", "--judge_url=http://j:1"],
                                   ["--judge.kind", "both", "--judge.url", "http://j:1"],
                                   ["--judge", '{"kind": "both", "url": "http://j:1"}']])
def test_evaluate_judge_flags_of_the_design_are_its_nested_keys(judge, capsys):
    assert _exit_code(["evaluate", "--endpoint", "e=http://h:1", *judge, "--generation.temperature", "0",
                       "--retry.max_attempts", "2", "--print_config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["judge"] == {"kind": "both", "url": "http://j:1", "model": None,
                                 "api_key_env": None, "refusal_markers": None, "request": "completion"}
    assert resolved["generation"]["temperature"] == 0 and resolved["retry"]["max_attempts"] == 2


def test_evaluate_arguments_take_the_short_forms_and_build_the_groups():
    from refusal_lightning.evaluation.client import GenerationSettings
    from refusal_lightning.evaluation.judges import JudgeSettings
    from refusal_lightning.evaluation.runner import evaluate_arguments

    got = evaluate_arguments({"judge": "llm", "judge_url": "http://j:1", "generation": {"max_tokens": 24},
                              "samples": 2}, "evaluation")
    assert got == {"judge": JudgeSettings("llm", "http://j:1"), "generation": GenerationSettings(max_tokens=24),
                   "samples": 2}
    assert evaluate_arguments({"judge": {"kind": "both"}, "judge_url": "http://j:1"}, "e")["judge"] == \
        JudgeSettings("both", "http://j:1")


def test_adapter_file_instead_of_folder_is_named(capsys, tmp_path, tiny_model_dir):
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    config = write_fit_config(tmp_path, tiny_model_dir, model={"merge_adapters": [str(weights)]})
    assert _exit_code(["fit", "--config", str(config)]) == 2
    line = _one_error_line(capsys)
    assert "is a file (adapter_model.safetensors)" in line and f"'{weights.parent}'" in line


# ------------------------------------------------------------------------------- first contact
@pytest.mark.parametrize("args,expected", [
    (["fit", "--config", "configs/tiny/refusal_lora.yaml", "--model.bogus", "1"],
     "error: unrecognized arguments: --model.bogus 1 (`python -m refusal_lightning fit --help` lists the options)"),
    (["fit", "--config", "configs/tiny/refusal_lora.yaml", "--data.batch_size", "many"],
     'error: Parser key "data.batch_size": Expected a <class \'int\'>. Got value: many '
     "(`python -m refusal_lightning fit --help` lists the options)"),
    (["directions", "--bogus", "1"],
     "error: unrecognized arguments: --bogus 1 (`python -m refusal_lightning directions --help` lists the options)"),
    (["fitt"], "error: unknown command 'fitt'; commands: fit, "),
], ids=["unknown-option", "wrong-type", "other-command", "unknown-command"])
def test_argument_errors_are_one_line_with_a_pointer_to_help(args, expected, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert _exit_code(args) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip() and not line.startswith("Seed set")]
    assert len(lines) == 1 and lines[0].startswith(expected), captured.err
    assert "usage:" not in captured.err + captured.out


@pytest.fixture
def fresh_copy(tmp_path, monkeypatch):
    """The repository's configs in an empty folder, as on a fresh clone (no artifacts/)."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("config,needles", [
    ("configs/tiny/attack.yaml",
     ["adapter 'artifacts/tiny/refusal_lora' does not exist yet (run `python -m refusal_lightning fit --config "
      "configs/tiny/refusal_lora.yaml`); then directions file 'artifacts/tiny/refusal_param_directions.pt' does "
      "not exist yet (run `python -m refusal_lightning directions --refusal_adapter_path artifacts/tiny/refusal_lora"]),
    ("configs/cpu/refusal_lora.yaml",
     ["model folder 'artifacts/models/smollm2-135m-instruct' does not exist yet (run `python -m refusal_lightning "
      "prepare-model --output_dir artifacts/models/smollm2-135m-instruct`)"]),
    ("configs/refusal_lora.yaml", ["model 'Qwen/Qwen3-0.6B' is not in the Hugging Face cache, and HF_HUB_OFFLINE is "
                                   "set (run `hf download Qwen/Qwen3-0.6B` once online"]),
], ids=["attack-before-refusal", "cpu-before-prepare-model", "real-offline"])
def test_missing_inputs_name_the_command_that_builds_them(config, needles, fresh_copy, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(fresh_copy / "empty_hf_cache"))
    assert _exit_code(["fit", "--config", config]) == 2
    line = _one_error_line(capsys)
    for needle in needles:
        assert needle in line, line
    assert not (fresh_copy / "artifacts").exists()  # nothing built for a run that cannot start


def test_tiny_refusal_config_runs_as_given_on_a_fresh_copy(tmp_path):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    result = run_module("fit", "--config", "configs/tiny/refusal_lora.yaml", "--trainer.max_steps", "3",
                        "--trainer.val_check_interval", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "building the tiny model at artifacts/tiny/tiny-qwen3" in result.stdout
    assert (tmp_path / "artifacts/tiny/tiny-qwen3/model.safetensors").exists()
    assert (tmp_path / "artifacts/tiny/refusal_lora/adapter_model.safetensors").exists()
    # The bar counts optimizer steps out of max_steps, with a rate and an ETA (not "Epoch 0/-2").
    bar = result.stdout  # Lightning's tqdm writes to stdout
    assert re.search(r"Epoch 0: 100%\S* 3/3 \[[0-9:]+<[0-9:]+, +[0-9.]+(step/s|s/step)", bar), bar[-2000:]
    assert "/-2" not in bar


def test_use_distributed_sampler_defaults_false_and_true_is_refused(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert _exit_code(["fit", "--config", "configs/tiny/refusal_lora.yaml", "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["use_distributed_sampler"] is False
    assert _exit_code(["fit", "--config", "configs/tiny/refusal_lora.yaml",
                       "--trainer.use_distributed_sampler", "true"]) == 2
    assert "trainer.use_distributed_sampler must be false" in _one_error_line(capsys)


def _readme_yaml_blocks(pipeline: bool = False) -> list[str]:
    """The README's YAML snippets: fit config pieces, or (``pipeline``) pipeline config pieces (with ``arms:``)."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"^( *)```yaml\n(.*?)^\1```", text, flags=re.S | re.M)
    bodies = [re.sub(rf"^{indent}", "", body, flags=re.M) for indent, body in blocks]
    return [b for b in bodies if ("arms" in (yaml.safe_load(b) or {})) == pipeline]


def test_readme_arms_snippet_parses_and_its_overrides_are_fit_flags(capsys, monkeypatch):
    from refusal_lightning.experiment.arms import parse_arms

    monkeypatch.chdir(REPO)
    (block,) = _readme_yaml_blocks(pipeline=True)
    pipe = yaml.safe_load(block)
    arms = parse_arms(pipe["arms"], pipe["attack_config"])
    assert [a.name for a in arms][:2] == ["vanilla", "orthogonal"] and not arms[-1].is_fit
    flags = [o for a in arms for o in a.overrides]
    assert _exit_code(["fit", "--config", pipe["attack_config"], *flags, "--print_config"]) == 0
    capsys.readouterr()


def test_readme_has_the_ddp_and_fsdp_snippets():
    strategies = [yaml.safe_load(b)["trainer"]["strategy"] for b in _readme_yaml_blocks()]
    assert "ddp" in strategies
    assert any(isinstance(s, dict) and s["class_path"].endswith("FSDPStrategy") for s in strategies)


@pytest.mark.parametrize("block", _readme_yaml_blocks())
def test_readme_yaml_snippets_parse_as_a_second_config(block, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    snippet = tmp_path / "snippet.yaml"
    snippet.write_text(block)
    assert _exit_code(["fit", "--config", "configs/refusal_lora.yaml", "--config", str(snippet),
                       "--print_config"]) == 0, capsys.readouterr().err
    resolved = yaml.safe_load(capsys.readouterr().out)["trainer"]
    for key, value in yaml.safe_load(block)["trainer"].items():
        if isinstance(value, dict):  # a class_path/init_args block: the class and every given init arg
            assert resolved[key]["class_path"] == value["class_path"]
            assert value["init_args"].items() <= resolved[key]["init_args"].items()
        else:
            assert resolved[key] == value
