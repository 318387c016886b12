"""directions.py: adapter folder -> directions file, loading, and validation against an attack model."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

from refusal_lightning import __version__
from refusal_lightning.defences.directions import (
    FORMAT,
    DirectionsError,
    build_projector,
    compute_directions,
    directions,
    load_directions,
    same_base_model,
    save_directions,
)
from refusal_lightning.defences.projection import ProjectionConfig
from refusal_lightning.defences.projector import Projector

TARGETS = ["q_proj", "v_proj"]


def lora_model(model_dir: Path, seed: int = 0, r: int = 4, alpha: float = 8, targets=TARGETS, **lora_kwargs):
    """The tiny model with a fresh PEFT LoRA; ``seed`` also randomises lora_B (PEFT starts it at zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **lora_kwargs))
    if seed:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def save_adapter(model, path: Path, base_model: str | None = None) -> Path:
    model.save_pretrained(path)
    if base_model is not None:  # what a real fit records; in-process models have no hub name
        config = json.loads((path / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_model
        (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def refusal(tmp_path_factory, tiny_model_dir):
    """(refusal PEFT model, adapter dir, directions file) with r=4, alpha=8 on q_proj/v_proj."""
    tmp = tmp_path_factory.mktemp("directions")
    model = lora_model(tiny_model_dir, seed=1)
    adapter = save_adapter(model, tmp / "refusal_lora", base_model=str(tiny_model_dir))
    out = directions(str(adapter), output_path=str(tmp / "dirs.pt"))
    return model, adapter, Path(out)


def cfg(path: Path | str | None, **kw) -> ProjectionConfig:
    return ProjectionConfig(enabled=True, directions_path=None if path is None else str(path), **kw)


# ------------------------------------------------------------------------------- computing + file
def test_recomputing_unchanged_directions_keeps_the_file_byte_for_byte(refusal, tmp_path):
    """A sweep fingerprints its units with the directions file's checksum: a new ``created_utc`` alone must not
    rewrite it; a changed value must."""
    _, adapter, _ = refusal
    out = Path(directions(str(adapter), output_path=str(tmp_path / "d.pt")))
    before = out.read_bytes()
    obj = load_directions(out)
    obj["metadata"]["created_utc"] = "2000-01-01T00:00:00+00:00"
    save_directions(obj, out)
    assert out.read_bytes() == before
    name = next(iter(obj["modules"]))
    obj["modules"][name]["S"] = obj["modules"][name]["S"] * 2
    save_directions(obj, out)
    assert out.read_bytes() != before and torch.equal(load_directions(out)["modules"][name]["S"],
                                                      obj["modules"][name]["S"])
    out.write_bytes(b"torn")  # not a directions file: overwritten, not an error
    save_directions(obj, out)
    assert load_directions(out)["metadata"]["created_utc"] == "2000-01-01T00:00:00+00:00"


def test_round_trip_matches_the_adapter(refusal, tiny_model_dir):
    model, adapter, path = refusal
    obj = torch.load(path, weights_only=True)  # plain containers only: no arbitrary unpickling
    assert obj["format"] == FORMAT and obj["version"] == 1
    meta = obj["metadata"]
    assert meta["base_model"] == str(tiny_model_dir)  # defaulted from adapter_config.json
    assert meta["adapter_sha256"] == hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert meta["rank"] == 4 and meta["alpha"] == 8 and meta["target_modules"] == sorted(TARGETS)
    assert meta["package_version"] == __version__ and meta["created_utc"].endswith("+00:00")
    assert meta["adapter_path"] == str(adapter.resolve())
    live = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(obj["modules"]) == len(live) == 4
    for name, module in live.items():
        key = name.removeprefix("base_model.model.")
        entry = obj["modules"][key]
        a, b = module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()
        assert torch.equal(entry["A"], a) and torch.equal(entry["B"], b)
        assert entry["scale"] == module.scaling["default"] == 2.0
        dense = (entry["scale"] * b.double() @ a.double())
        assert entry["norm"] == pytest.approx(float(dense.norm()), rel=1e-9)  # from the r x r Grams
        usv = entry["U"].double() @ torch.diag(entry["S"].double()) @ entry["V"].double().T
        torch.testing.assert_close(usv, dense, atol=1e-5, rtol=0)
        assert entry["U"].shape == (b.shape[0], 4) and entry["V"].shape == (a.shape[1], 4)
        torch.testing.assert_close(entry["A_dir"].norm(), torch.tensor(1.0))
    assert load_directions(path)["modules"].keys() == obj["modules"].keys()


def test_scale_respects_rslora_and_patterns(tmp_path, tiny_model_dir):
    for name, kwargs in {"rslora": {"use_rslora": True},
                         "patterns": {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 6}}}.items():
        model = lora_model(tiny_model_dir, seed=2, **kwargs)
        obj = compute_directions(save_adapter(model, tmp_path / name), base_model_name="tiny")
        for mname, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                entry = obj["modules"][mname.removeprefix("base_model.model.")]
                assert entry["scale"] == pytest.approx(module.scaling["default"]), (name, mname)
                assert entry["rank"] == module.r["default"]


def test_k_max_truncates_and_subspace_k_is_checked_against_it(tmp_path, refusal, tiny_model_dir):
    _, adapter, _ = refusal
    out = directions(str(adapter), output_path=str(tmp_path / "k2.pt"), k_max=2)
    entry = next(iter(load_directions(out)["modules"].values()))
    assert entry["S"].shape == (2,) and entry["U"].shape[1] == 2
    with pytest.raises(DirectionsError, match="k=3 exceeds"):
        build_projector(cfg(out, mode="subspace", k=3), lora_model(tiny_model_dir), str(tiny_model_dir))


def test_adapter_errors(tmp_path, tiny_model_dir):
    with pytest.raises(DirectionsError, match="does not exist"):
        compute_directions(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DirectionsError, match="adapter_config.json"):
        compute_directions(tmp_path / "empty")
    untrained = save_adapter(lora_model(tiny_model_dir, seed=0), tmp_path / "untrained", base_model="tiny")
    with pytest.raises(DirectionsError, match="was it trained"):
        compute_directions(untrained)
    no_base = save_adapter(lora_model(tiny_model_dir, seed=3), tmp_path / "no_base")
    config = json.loads((no_base / "adapter_config.json").read_text())
    (no_base / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(DirectionsError, match="base_model_name"):
        compute_directions(no_base)


def test_not_a_directions_file(tmp_path):
    cases = {"tensor.pt": lambda p: torch.save(torch.ones(3), p),
             "text.pt": lambda p: p.write_text("hello"),
             "pickle.pt": lambda p: p.write_bytes(pickle.dumps(Path("x"), protocol=2))}  # not loadable weights_only
    for name, write in cases.items():
        write(tmp_path / name)
        with pytest.raises(DirectionsError, match="is not a refusal directions file") as err:
            load_directions(tmp_path / name)
        assert name in str(err.value)
    with pytest.raises(DirectionsError, match="does not exist"):
        load_directions(tmp_path / "missing.pt")
    with pytest.raises(DirectionsError):
        save_directions({"format": "something else"}, tmp_path / "x.pt")


def test_same_base_model(tmp_path):
    (tmp_path / "m").mkdir()
    assert same_base_model("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B")
    assert same_base_model(str(tmp_path / "m"), str(tmp_path / "." / "m") + "/")
    assert not same_base_model("Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B")
    assert not same_base_model(str(tmp_path / "m"), "Qwen/Qwen3-0.6B")


# -------------------------------------------------------------------------------------- validation
def test_build_projector_matches_every_module_and_projects(refusal, tiny_model_dir):
    _, _, path = refusal
    attack = lora_model(tiny_model_dir, seed=5)  # B != 0 so that every A gets a gradient

    class Holder(torch.nn.Module):  # names as a LightningModule sees them: "model.base_model.model..."
        def __init__(self):
            super().__init__()
            self.model = attack

    proj = build_projector(cfg(path, mode="lora_param"), Holder(), str(tiny_model_dir))
    assert isinstance(proj, Projector) and len(proj.module_names) == 4
    ids = torch.arange(2, 18)[None]
    attack(input_ids=ids, labels=ids).loss.backward()
    removed = proj.project_grads_(apply=True)["proj/removed_frac"]
    assert 0 < removed.item() < 1
    obj = load_directions(path)
    for name, module in attack.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            entry = obj["modules"][name.removeprefix("base_model.model.")]
            g = module.lora_A["default"].weight.grad
            assert abs(float((g * entry["A_dir"]).sum())) < 1e-6 * float(g.norm())
    summary = proj.summary()
    assert summary["n_modules_covered"] == 4 and summary["directions"]["base_model"] == str(tiny_model_dir)
    json.dumps(summary)
    assert build_projector(ProjectionConfig(), attack, "x") is None


@pytest.mark.parametrize(("config", "attack_kw", "base", "message"), [
    ({"mode": "delta_weight"}, {}, "Qwen/Qwen3-0.6B", "directions were computed for base model"),
    ({"mode": "lora_param"}, {"r": 2}, None, "needs the attack LoRA rank to equal the refusal rank"),
    ({"mode": "lora_param"}, {"targets": ["q_proj"]}, None, "needs identical LoRA targets"),
    ({"mode": "subspace", "k": 5}, {}, None, "subspace k=5 exceeds the refusal rank"),
    ({"mode": "delta_weight"}, {"targets": ["q_proj", "v_proj", "o_proj"]}, None,
     "2 of 6 attack LoRA modules have no refusal direction"),
])
def test_each_bad_input_gives_one_clear_message(refusal, tiny_model_dir, config, attack_kw, base, message):
    _, _, path = refusal
    with pytest.raises(DirectionsError, match=message) as err:
        build_projector(cfg(path, **config), lora_model(tiny_model_dir, **attack_kw), base or str(tiny_model_dir))
    assert "1 problem(s)" in str(err.value) and str(path) in str(err.value)


def test_partial_coverage_allowed_when_asked(refusal, tiny_model_dir):
    _, _, path = refusal
    attack = lora_model(tiny_model_dir, targets=["q_proj", "v_proj", "o_proj"])
    proj = build_projector(cfg(path, allow_partial=True), attack, str(tiny_model_dir))
    assert proj.summary()["n_modules_uncovered"] == 2


def test_file_problems_and_all_problems_at_once(tmp_path, refusal, tiny_model_dir):
    _, _, path = refusal
    attack = lora_model(tiny_model_dir)
    with pytest.raises(DirectionsError, match="does not exist"):
        build_projector(cfg(tmp_path / "missing.pt"), attack, str(tiny_model_dir))
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(DirectionsError, match="other.pt' is not a refusal directions file"):
        build_projector(cfg(tmp_path / "other.pt"), attack, str(tiny_model_dir))
    with pytest.raises(DirectionsError, match="directions_path is not set"):
        build_projector(cfg(None), attack, str(tiny_model_dir))
    with pytest.raises(DirectionsError) as err:
        build_projector(cfg(path, mode="subspace", k=9), lora_model(tiny_model_dir, r=2), "Qwen/Qwen3-0.6B")
    text = str(err.value)
    assert "2 problem(s)" in text and "base model" in text and "k=9 exceeds" in text


def test_a_file_instead_of_the_adapter_folder_is_named(refusal, capsys):
    from refusal_lightning.cli import main

    _, adapter, _ = refusal
    weights = adapter / "adapter_model.safetensors"
    with pytest.raises(DirectionsError, match=r"is a file \(adapter_model.safetensors\), not an adapter folder; "
                                              r"pass the folder that holds it: '.*refusal_lora'"):
        compute_directions(weights)
    with pytest.raises(SystemExit) as info:
        main(["directions", "--refusal_adapter_path", str(weights)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0] and "does not exist" not in err[0]
