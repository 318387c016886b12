"""CLI contract: --help for every command, every shipped YAML parses, one clear line per bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_fit_config

from refusal_lightning.cli import COMMAND_TARGETS, LIGHTNING_COMMANDS, main

CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml"))
FIT_CONFIGS = [c for c in CONFIGS if not c.endswith("pipeline.yaml")]


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


@pytest.mark.parametrize("folder", ["configs", "configs/tiny"])
def test_attack_configs_differ_only_in_projection_switch_and_names(folder):
    def flat(d, prefix=""):
        items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else None
        if items is None:
            return {prefix: d}
        return {k: v for key, val in items for k, v in flat(val, f"{prefix}.{key}" if prefix else str(key)).items()}

    vanilla = flat(yaml.safe_load((REPO / folder / "attack_vanilla.yaml").read_text()))
    ortho = flat(yaml.safe_load((REPO / folder / "attack_orthogonal.yaml").read_text()))
    assert vanilla.keys() == ortho.keys()
    differing = {k for k in vanilla if vanilla[k] != ortho[k]}
    names = {"model.output_dir", "trainer.logger.init_args.name", "trainer.callbacks.0.init_args.dirpath"}
    assert differing == {"model.projection.enabled"} | names
    assert vanilla["model.projection.enabled"] is False and ortho["model.projection.enabled"] is True
    assert vanilla["model.projection.directions_path"]  # the vanilla run is monitored on the same scale
    refusal = flat(yaml.safe_load((REPO / folder / "refusal_lora.yaml").read_text()))
    for key in ("model.lora.r", "model.lora.alpha", "model.model_name_or_path"):
        assert refusal[key] == vanilla[key], key


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


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.endswith("pipeline.yaml")])
def test_every_pipeline_yaml_parses(config, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert _exit_code(["pipeline", "--config", config, "--print_config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    for key in ("refusal_config", "vanilla_config", "orthogonal_config"):
        assert (REPO / resolved[key]).exists(), resolved[key]
    assert resolved["serve"] or set(resolved["endpoints"]) == {"base", "refusal", "vanilla", "orthogonal"}
