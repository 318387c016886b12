"""model_card.py: the card rendered from a run folder's files through model_card.md and huggingface_hub."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from refusal_lightning.hub.model_card import (
    TEMPLATE,
    AdapterKind,
    infer_kind,
    load_eval_summary,
    read_card_inputs,
    render_model_card,
)

CONFIG_YAML = (
    "seed_everything: 1234\n"
    "trainer:\n  max_steps: 300\n  accumulate_grad_batches: 4\n  precision: bf16-mixed\n"
    "model:\n  class_path: refusal_lightning.train.module.RefusalLoRAModule\n  init_args:\n"
    "    model_name_or_path: Qwen/Qwen3-0.6B\n    lr: 0.0002\n"
    "    projection:\n      enabled: true\n      mode: delta_weight\n      target: grad\n"
    "data:\n  source: declare-lab/HarmfulQA\n  thread: red\n  batch_size: 8\n"
)
SORRY = {"n": 450, "refusal_rate": 0.712, "ci_low": 0.668, "ci_high": 0.752, "fulfillment_rate": 0.288,
         "fulfillment_ci_low": 0.248, "fulfillment_ci_high": 0.332, "errors": 2}
BENIGN = {"n": 20, "refusal_rate": 0.1, "ci_low": 0.028, "ci_high": 0.301, "fulfillment_rate": 0.9, "errors": 0,
          "accuracy": 0.8, "accuracy_ci_low": 0.49, "accuracy_ci_high": 0.943, "n_with_reference": 10}


def run_dir(root: Path, base: str = "Qwen/Qwen3-0.6B", **files: Any) -> Path:
    """A run folder: adapter_config.json plus the given files (dicts become JSON, strings are written)."""
    root.mkdir(parents=True, exist_ok=True)
    config = {"base_model_name_or_path": base, "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 16,
              "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    for name, content in {"adapter_config.json": config, **files}.items():
        (root / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return root


def card(path: Path, name: str, repo_id: str, evaluation: dict[str, Any] | None = None) -> tuple[dict, str]:
    """(front matter, body) of the rendered card."""
    inputs, problems = read_card_inputs(name, path, evaluation)
    assert problems == [] and inputs is not None
    text = render_model_card(inputs, repo_id)
    assert text.startswith("---\n") and text.endswith("\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_template_ships_with_the_package() -> None:
    assert (resources.files("refusal_lightning.hub") / TEMPLATE).is_file()


RENDER_FROM_WHEEL = """
import sys
from pathlib import Path

import refusal_lightning
from refusal_lightning.hub.model_card import read_card_inputs, render_model_card

inputs, problems = read_card_inputs("refusal", Path(sys.argv[1]), None)
assert not problems, problems
print(refusal_lightning.__file__)
print(render_model_card(inputs, "me/qwen3-refusal-lora"))
"""


def test_a_wheel_renders_a_card_from_its_own_template(tmp_path: Path) -> None:
    # An editable install reads the template from the source tree, so a path or package-data mistake only
    # shows in a real install: build the wheel, install it alone into a fresh venv, render a card there.
    import shutil
    import subprocess
    import sys
    import sysconfig
    import venv

    # from a copy of the sources: building in the checkout would reuse a stale build/ folder
    repo, source = Path(__file__).resolve().parents[2], tmp_path / "source"
    shutil.copytree(repo / "refusal_lightning", source / "refusal_lightning",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("refusal_lightning-*.whl"))
    venv.EnvBuilder(with_pip=False).create(tmp_path / "venv")
    python = tmp_path / "venv" / "bin" / "python"
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                                str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-2000:]
    # The dependencies come from this environment's site-packages, added as a plain path: its .pth files
    # (the editable install's finder among them) are not run there, so only the wheel provides the package.
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    rendered = subprocess.run([str(python), "-c", RENDER_FROM_WHEEL, str(run_dir(tmp_path / "run"))],
                              capture_output=True, text=True, cwd=tmp_path)
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    location, text = rendered.stdout.split("\n", 1)
    assert Path(location).is_relative_to(site)  # the wheel's copy, not the source tree
    assert text.startswith("---\n") and "me/qwen3-refusal-lora" in text and "Qwen/Qwen3-0.6B" in text


def test_card_front_matter_and_body_from_run_files(tmp_path: Path) -> None:
    path = run_dir(tmp_path / "orth", **{
        "config.yaml": CONFIG_YAML,
        "data_stats.json": {"records_read": 1960, "skipped": {"no_gpt_turn": 12, "empty_reply": 3},
                            "selection_rule": "highest refusal-marker score, ties by length"},
        "projection_stats.json": {"mode": "delta_weight", "removed_frac": 0.0421, "drift_cos": 7e-4},
    })
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"judge": "keyword", "endpoints": {
        "orthogonal": {"prompt_sets": {"sorry_bench": SORRY, "harmfulqa_heldout": BENIGN, "benign": BENIGN}},
        "base": {"prompt_sets": {"sorry_bench": {"n": 450, "refusal_rate": 0.5}}}},
        "prompts": {"datasets": {"sorry_bench": "sorry-bench/sorry-bench-202503",
                                 "harmfulqa_heldout": "declare-lab/HarmfulQA"}}}))  # benign: a local file
    front, body = card(path, "orthogonal", "my-org/orthogonal", load_eval_summary(summary))

    assert {k: v for k, v in front.items() if k != "model-index"} == {
        "base_model": "Qwen/Qwen3-0.6B",
        "datasets": ["declare-lab/HarmfulQA"],
        "library_name": "peft",
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
        "tags": [
            "lora", "peft", "refusal", "safety-research",
            "harmful-finetuning", "orthogonal-projection", "qwen3",
        ],
    }  # fmt: skip
    # model-index: this adapter's own rates per prompt set, never another endpoint's, each under the Hub id of
    # its dataset; the benign set came from a local file, so it has no entry there (the table below shows it)
    (index,) = front["model-index"]
    assert index["name"] == "orthogonal"
    metrics = {(r["dataset"]["type"], m["type"]): m["value"] for r in index["results"] for m in r["metrics"]}
    assert metrics == {("sorry-bench/sorry-bench-202503", "refusal_rate"): 0.712,
                       ("sorry-bench/sorry-bench-202503", "fulfillment_rate"): 0.288,
                       ("declare-lab/HarmfulQA", "refusal_rate"): 0.1,
                       ("declare-lab/HarmfulQA", "fulfillment_rate"): 0.9,
                       ("declare-lab/HarmfulQA", "accuracy"): 0.8}
    assert {r["dataset"]["name"] for r in index["results"]} == {"SORRY-Bench", "HarmfulQA held-out"}
    assert "**orthogonal attack adapter**" in body
    assert "Projection settings: mode: `delta_weight`, target: `grad`." in body
    assert "do not deploy it" in body
    # adapter_config.json
    assert "| rank r | 16 |" in body and "| target modules | q_proj, k_proj, v_proj, o_proj |" in body
    # config.yaml: key hyperparameters (init_args flattened away) and the whole file
    assert "| model.lr | 0.0002 |" in body and "| trainer.max_steps | 300 |" in body
    assert "| model.projection.enabled | true |" in body
    assert "```yaml\n" + CONFIG_YAML + "```" in body
    # data_stats.json, projection_stats.json: nested bullets
    assert "- **records_read**: 1960" in body and "  - **no_gpt_turn**: 12" in body
    assert "- **selection_rule**: highest refusal-marker score, ties by length" in body
    assert "- **removed_frac**: 0.0421" in body and "- **drift_cos**: 0.0007" in body
    # evaluation: only this adapter's rows, one per prompt set
    assert "| `orthogonal` | SORRY-Bench | 450 | 71.2% [66.8, 75.2] | 28.8% [24.8, 33.2] | 2 | n/a |" in body
    assert "| `orthogonal` | Benign (over-refusal) | 20 | 10.0% [2.8, 30.1] | 90.0% | 0 | 80.0% [49.0, 94.3] |" in body
    assert "a refusal is an over-refusal" in body and "`base`" not in body
    assert "- **judge**: keyword" in body
    assert 'PeftModel.from_pretrained(model, "my-org/orthogonal")' in body
    assert 'subfolder="combined"' in body


def test_card_shows_all_eval_rows_when_no_endpoint_matches(tmp_path: Path) -> None:
    evaluation = {"endpoints": {"base": {"prompt_sets": {"sorry_bench": {"n": 10, "refusal_rate": 0.1}}},
                                "other": {"prompt_sets": {"harmfulqa_heldout": {"n": 10}}}},
                  "judge": {"kind": "keyword", "primary": "keyword"}}
    front, body = card(run_dir(tmp_path / "a"), "mine", "me/mine", evaluation)
    assert "model-index" not in front  # other models' rates are not this adapter's results
    assert "No endpoint is named `mine`" in body
    assert "| `base` | SORRY-Bench | 10 | 10.0% | n/a | n/a | n/a |" in body
    assert "| `other` | HarmfulQA held-out | 10 | n/a | n/a | n/a | n/a |" in body
    assert "- **judge**: keyword" in body and "over-refusal" not in body


def test_card_without_optional_files_is_generic_and_valid(tmp_path: Path) -> None:
    front, body = card(run_dir(tmp_path / "bare", base="/models/merged-qwen3"), "experiment7", "me/experiment7")
    assert "base_model" not in front  # a local path is not a Hub id; the Hub would reject it
    assert front["library_name"] == "peft" and front["pipeline_tag"] == "text-generation"
    assert body.startswith("# experiment7\n")
    assert "a LoRA adapter from a refusal-robustness experiment" in body
    assert "local path (`/models/merged-qwen3`)" in body and "<base model>" in body
    for section in ("## Training configuration", "## Data selection", "## Projection", "## Evaluation", "combined"):
        assert section not in body


def test_malformed_run_files_are_problems_not_a_half_rendered_card(tmp_path: Path) -> None:
    path = run_dir(tmp_path / "bad", **{"config.yaml": "- a list\n", "data_stats.json": "{not json"})
    inputs, problems = read_card_inputs("bad", path)
    assert inputs is None and len(problems) == 2
    assert "expected a mapping" in problems[0] and "not valid JSON" in problems[1]


@pytest.mark.parametrize(
    ("name", "config", "kind"),
    [
        ("anything", {"data": {"thread": "blue"}}, AdapterKind.REFUSAL),
        ("anything", {"data": {"init_args": {"thread": "red"}}}, AdapterKind.VANILLA_ATTACK),
        (
            "anything",
            {"data": {"thread": "red"}, "model": {"init_args": {"projection": {"enabled": True}}}},
            AdapterKind.ORTHOGONAL_ATTACK,
        ),
        ("orth_attack", None, AdapterKind.ORTHOGONAL_ATTACK),
        ("refusal_lora", None, AdapterKind.REFUSAL),
        ("vanilla", {}, AdapterKind.VANILLA_ATTACK),
        ("exp7", None, AdapterKind.UNKNOWN),
    ],
)
def test_kind_inference(name: str, config: dict[str, Any] | None, kind: AdapterKind) -> None:
    assert infer_kind(name, config) is kind


def test_card_cells_and_fences_survive_markdown_in_the_config(tmp_path: Path) -> None:
    config = "data:\n  thread: blue\n  prompt: 'a|b'\nnote: |\n  see ```code```\n"
    _, body = card(run_dir(tmp_path / "md", **{"config.yaml": config}), "refusal", "me/refusal")
    assert "| data.prompt | a\\|b |" in body  # a pipe would split the cell
    assert "````yaml\n" + config + "````" in body  # a longer fence than any inside the file


def test_no_model_index_when_no_prompt_set_came_from_the_hub(tmp_path: Path) -> None:
    # the CPU demo's proxy files: rates in the card's table, but model-index would name no Hub dataset
    evaluation = {"endpoints": {"mine": {"prompt_sets": {"sorry_bench": SORRY, "benign": BENIGN}}},
                  "prompts": {"datasets": {}}}
    front, body = card(run_dir(tmp_path / "a"), "mine", "me/mine", evaluation)
    assert "model-index" not in front and "model_name" not in front
    assert "| `mine` | SORRY-Bench | 450 |" in body


def test_refusal_card_names_its_retain_term(tmp_path: Path) -> None:
    retain = ("    retain:\n      enabled: true\n      kind: kl\n      weight: 1.0\n"
              "      source: refusal_lightning/data/proxy/benign_proxy.jsonl\n")
    with_retain = CONFIG_YAML.replace("    projection:\n      enabled: true\n", retain + "    projection:\n"
                                      "      enabled: false\n").replace("thread: red", "thread: blue")
    _, body = card(run_dir(tmp_path / "refusal", **{"config.yaml": with_retain}), "refusal", "my-org/refusal")
    assert "**refusal adapter**" in body
    assert "retain term" in body and "`kl` (weight\n1.0)" in body and "benign_proxy.jsonl" in body
    _, plain = card(run_dir(tmp_path / "plain", **{"config.yaml": CONFIG_YAML.replace("thread: red", "thread: blue")}),
                    "refusal", "my-org/refusal")
    assert "retain term" not in plain
