"""``preflight``: what would stop the real run, found in about a minute without a GPU or a server.

It starts nothing and spends no GPU time. It checks, one line each (PASS, FAIL or SKIPPED):
- the pipeline config and the fit configs it names;
- that every Hub model and dataset the run reads can be reached with this environment's token, gated
  ones included (``HfApi.auth_check``: no download);
- that the HarmfulQA file parses with this code, and how many pairs each thread yields;
- the vLLM version (vLLM lives in its own environment: ``--vllm`` names its executable);
- the vLLM commands it would use for the configured card, with their memory arithmetic, and that the
  endpoints the config evaluates are the ones those commands serve;
- GPU memory per stage for the configured batch sizes, as an estimate.
Offline, a check that needs the Hub says SKIPPED and names what it could not check. Exit code 0 when
every check passed, 1 when any failed, 3 when none failed but some were skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from refusal_lightning.experiment.arms import ArmsError, arm_folders, arms_of, resolved_config
from refusal_lightning.experiment.memory_estimate import fit_memory
from refusal_lightning.experiment.pipeline import evaluated_adapters
from refusal_lightning.models.stacking import CONFIG_FILE, adapter_rank
from refusal_lightning.samples import looks_like_hub_id
from refusal_lightning.serving.vllm_plan import CARDS, JUDGE_MODEL, KNOWN_CONFIGS, ModelShape, plan_servers, wait_for

Status = Literal["PASS", "FAIL", "SKIPPED"]
EXIT_CODES = {"PASS": 0, "FAIL": 1, "SKIPPED": 3}
# --generation-config vllm and the LoRA flags used here are in vLLM's docs from 0.8 on (checked: 0.11-0.14).
MIN_VLLM = (0, 8, 0)
# ``--config`` would be jsonargparse's own "load these arguments from a YAML file"; here it names the pipeline
# config to check (``preflight --config configs/pipeline.yaml``), so the CLI maps it to ``--pipeline_config``.
SHORT_FLAGS = {"config": "pipeline_config"}


DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class PreflightError(ValueError):
    """The pipeline config itself cannot be read: nothing else can be checked."""


@dataclass(frozen=True)
class Check:
    status: Status
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<7} {self.name}: {self.detail}"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_check(repo_id: str, repo_type: Literal["model", "dataset"]) -> Check:
    """Can this environment's token read ``repo_id``? Gated repos need accepted terms and ``HF_TOKEN``."""
    name = f"hub {repo_type} {repo_id}"
    if _offline():
        return Check("SKIPPED", name, "HF_HUB_OFFLINE is set, so access (gated terms, token) was not checked")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    try:
        HfApi().auth_check(repo_id, repo_type=repo_type)  # the token comes from HF_TOKEN or `hf auth login`
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: test it first
        return Check("FAIL", name, f"gated, and this token has no access: accept its terms at {page} and set "
                                   "HF_TOKEN (also in the vLLM judge's environment)")
    except RepositoryNotFoundError:
        return Check("FAIL", name, "not found, or private and this token cannot see it")
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", "?")
        return Check("FAIL", name, f"HTTP {status} from the Hub")
    except Exception as err:  # connection errors of the HTTP library huggingface_hub uses (httpx or requests)
        return Check("SKIPPED", name, f"the Hub could not be reached ({type(err).__name__}), so access was not checked")
    return Check("PASS", name, "reachable with this token")


def _hub_id(source: str | None) -> str | None:
    """``source`` when it names a Hub repo rather than a local path or the bundled sample."""
    if not source or source == "sample" or Path(os.path.expanduser(source)).exists():
        return None
    return source if looks_like_hub_id(source) else None


def source_check(source: str, repo_type: Literal["model", "dataset"], what: str) -> Check:
    if Path(source).suffix in DATA_FILE_SUFFIXES and not Path(os.path.expanduser(source)).exists():
        # a file a later step writes (the README's `xstest`), not a Hub repo whose name ends in .jsonl
        return Check("SKIPPED", f"{what} {source}", "a local file not written yet, so not checked (XSTest's "
                     f"safe prompts: `python -m refusal_lightning xstest --output_path {source}`)")
    repo = _hub_id(source)
    if repo is not None:
        return hub_check(repo, repo_type)
    if source == "sample" or Path(os.path.expanduser(source)).exists():
        return Check("PASS", f"{what} {source}", "local" if source != "sample" else "bundled sample")
    return Check("FAIL", f"{what} {source}", "neither a local path nor a Hub id")


def harmfulqa_check(source: str, data: dict[str, Any], hub: Check | None) -> Check:
    """Parse the HarmfulQA file with this code; pairs per thread, as the fits would extract them."""
    from refusal_lightning.train.harmfulqa import DataSourceError, extract_pairs, load_records, split_question_ids

    name = f"harmfulqa {source}"
    if hub is not None and hub.status != "PASS":
        return Check("SKIPPED", name, "needs the Hub dataset, which was not reachable: parsing and pair counts "
                                      "not checked")
    try:
        records = load_records(source)
    except DataSourceError as err:
        return Check("FAIL", name, str(err))
    selection, prompt = data.get("selection", "most_indicative"), data.get("prompt", "question")
    counts, problems = [], []
    ids: set[int] = set()
    for thread in ("blue", "red"):
        pairs, stats = extract_pairs(records, thread=thread, selection=selection, prompt=prompt)
        ids |= {p.question_id for p in pairs}
        skipped = sum(stats.skipped_records.values()) + sum(stats.skipped_conversations.values())
        counts.append(f"{thread} {len(pairs)} pairs from {stats.records_used} records "
                      f"({stats.conversations_used} conversations, {skipped} skipped)")
        if not pairs:
            problems.append(f"no usable {thread} pairs (skipped: {stats.as_dict()['skipped_records']})")
    val_fraction = float(data.get("val_fraction", 0.1))
    _, val = split_question_ids(ids, val_fraction, int(data.get("seed", 0))) if ids else (set(), set())
    detail = (f"{len(records)} records; " + "; ".join(counts) + f" (selection {selection}, prompt {prompt}); "
              f"{len(val)} of {len(ids)} questions held out")
    return Check("FAIL", name, detail + "; " + "; ".join(problems)) if problems else Check("PASS", name, detail)


def vllm_check(vllm: str) -> Check:
    """The vLLM executable's version (run, not imported: it lives in its own environment)."""
    path = shutil.which(vllm)
    if path is None:
        return Check("SKIPPED", "vllm", f"'{vllm}' not found on PATH (vLLM lives in its own environment; pass "
                                        "--vllm /path/to/its/bin/vllm), so its version was not checked")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as err:
        return Check("FAIL", "vllm", f"{path} --version did not run: {err}")
    found = re.findall(r"\b(\d+)\.(\d+)\.(\d+)", out.stdout + out.stderr)
    if out.returncode != 0 or not found:
        return Check("FAIL", "vllm", f"{path} --version exited {out.returncode} without a version")
    version = tuple(int(x) for x in found[-1])
    text = ".".join(map(str, version))
    if version < MIN_VLLM:
        return Check("FAIL", "vllm", f"{text} at {path}; needs >= {'.'.join(map(str, MIN_VLLM))} "
                                     "(--generation-config vllm)")
    return Check("PASS", "vllm", f"{text} at {path}")


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise PreflightError(f"{what} {path}: cannot be read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise PreflightError(f"{what} {path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise PreflightError(f"{what} {path}: expected a mapping of keys, got {type(data).__name__}")
    return data


def model_shape(base_model: str, hub: Check) -> tuple[ModelShape | None, str]:
    """The base model's shape: its local ``config.json``, the Hub's, or the bundled copy for the real model."""
    import json

    local = Path(os.path.expanduser(base_model)) / "config.json"
    if local.is_file():
        return ModelShape.from_config(json.loads(local.read_text())), "local config.json"
    if hub.status == "PASS":
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(base_model, "config.json")
            return ModelShape.from_config(json.loads(Path(path).read_text())), "the Hub's config.json"
        except Exception as err:  # fall through to the bundled shape; say why
            reason = f"config.json not downloaded ({type(err).__name__})"
    else:
        reason = "the Hub not reached"
    if base_model in KNOWN_CONFIGS:
        return ModelShape.from_config(KNOWN_CONFIGS[base_model]), f"bundled config of {base_model}, {reason}"
    return None, reason


def _served_adapters(pipe: dict[str, Any], fits: dict[str, dict[str, Any]], arms: list) -> dict[str, str]:
    """The adapters the policy server must serve: as ``pipeline`` evaluates them (``evaluated_adapters``)."""
    outputs = {name: Path(cfg["model"]["output_dir"]) for name, cfg in fits.items()}
    folders = arm_folders(arms, Path(str(pipe.get("run_dir", "artifacts"))), outputs)
    served = evaluated_adapters(outputs["refusal"], folders)
    return {name: str(path) for name, path in served.items()}


def _served_rank(served: dict[str, str], fits: dict[str, dict[str, Any]]) -> tuple[int, str]:
    """Largest rank among the served adapters: read from them when trained, else from the fit configs."""
    if all((Path(p) / CONFIG_FILE).is_file() for p in served.values()):
        return max(adapter_rank(p) for p in served.values()), "from the trained adapters"
    ranks = {name: int((cfg["model"].get("lora") or {}).get("r", 8)) for name, cfg in fits.items()}
    attack = max((r for n, r in ranks.items() if n != "refusal"), default=0)
    return ranks["refusal"] + attack, "r_refusal + r_attack from the fit configs (not trained yet)"


def _endpoint_problems(pipe: dict[str, Any], base_model: str, served: dict[str, str]) -> list[str]:
    problems = []
    for name, url in (pipe.get("endpoints") or {}).items():
        model = str(url).partition("#")[2]
        if model and model != base_model and model not in served:
            problems.append(f"endpoint {name} asks for model '{model}', which the vLLM command does not serve")
    return problems


def run_checks(config: str, gpu_gb: int, vllm: str, emit: Callable[[str], None]) -> list[Check]:
    """Every check, printed as it finishes (``emit``), plus the vLLM commands; returns the checks."""
    checks: list[Check] = []

    def add(check: Check) -> Check:
        checks.append(check)
        emit(check.line())
        return check

    pipe = _read_yaml(Path(config), "pipeline config")
    if not pipe.get("refusal_config"):
        raise PreflightError(f"pipeline config {config}: no refusal_config")
    try:
        arms, _ = arms_of(pipe)
    except ArmsError as exc:
        raise PreflightError(f"pipeline config {config}: {exc}") from None
    fits: dict[str, dict[str, Any]] = {"refusal": _read_yaml(Path(pipe["refusal_config"]), "refusal_config")}
    for arm in (a for a in arms if a.is_fit):
        _read_yaml(arm.config, f"arms.{arm.name} config")  # a missing or broken file, named
        fits[arm.name] = yaml.safe_load(resolved_config(arm))
    read = sorted({str(pipe["refusal_config"]), *(str(a.config) for a in arms if a.is_fit)})
    from refusal_lightning.evaluation.runner import evaluate_arguments

    evaluation = evaluate_arguments(pipe.get("evaluation") or {}, f"{config}: evaluation")
    judge = evaluation.get("judge")
    add(Check("PASS", "config", f"{config}, its arms ({', '.join(a.name for a in arms)}) and their fit configs "
                                f"({', '.join(read)}) parse; the evaluation section is valid"))

    base_model = str(pipe.get("base_model") or fits["refusal"]["model"]["model_name_or_path"])
    base = add(source_check(base_model, "model", "base model"))
    judge_model = None
    if judge is not None and judge.kind in ("llm", "both"):
        judge_model = judge.model or JUDGE_MODEL
        add(source_check(judge_model, "model", "judge model"))
    data = fits["refusal"].get("data") or {}
    harmfulqa = str(data.get("source", "sample"))
    hub = add(source_check(harmfulqa, "dataset", "HarmfulQA"))
    for key in ("prompts", "benign_prompts"):
        if evaluation.get(key):
            add(source_check(str(evaluation[key]), "dataset", f"evaluation.{key}"))
    add(harmfulqa_check(harmfulqa, data, hub if _hub_id(harmfulqa) else None))
    add(vllm_check(vllm))

    shape, shape_source = model_shape(base_model, base)
    shape_source = f"shape: {shape_source}"
    card = CARDS[gpu_gb]
    if shape is None:
        add(Check("SKIPPED", "vllm commands", f"the shape of {base_model} is unknown ({shape_source})"))
        add(Check("SKIPPED", "gpu memory", f"the shape of {base_model} is unknown ({shape_source})"))
        return checks
    served = _served_adapters(pipe, fits, arms)
    rank, rank_source = _served_rank(served, fits)
    policy, judge_plan = plan_servers(gpu_gb, base_model, shape, served, rank, judge_model or JUDGE_MODEL)
    problems = _endpoint_problems(pipe, base_model, served)
    problems += [f"{p.role} server does not fit: {p.arithmetic()}" for p in (policy, judge_plan) if not p.fits]
    detail = (f"{len(served)} adapters (--max-loras {len(served)}), rank {rank} {rank_source} -> --max-lora-rank "
              f"{policy.max_lora_rank}; memory shares {policy.utilization:.2f} + {judge_plan.utilization:.2f} of "
              f"{card.name} ({shape_source})")
    add(Check("FAIL", "vllm commands", detail + "; " + "; ".join(problems)) if problems
        else Check("PASS", "vllm commands", detail))
    precision = None
    for stage, cfg in fits.items():
        precision = (cfg.get("trainer") or {}).get("precision")
        est = fit_memory(shape, cfg.get("model") or {}, cfg.get("data") or {}, precision)
        d = cfg.get("data") or {}
        detail = (f"batch {d.get('batch_size', 1)} x {d.get('max_length', 512)}, {precision or 'fp32'}: "
                  f"{est.describe()} of {card.gib:g} GiB (estimate)")
        add(Check("PASS" if est.total_gib <= card.gib else "FAIL", f"gpu memory, {stage} fit", detail))
    both = policy.budget_gib + judge_plan.budget_gib
    add(Check("PASS" if policy.fits and judge_plan.fits else "FAIL", "gpu memory, evaluation",
              f"policy {policy.budget_gib:.1f} + judge {judge_plan.budget_gib:.1f} = {both:.1f} GiB of {card.gib:g} "
              "(the two vLLM servers; estimate)"))
    emit("")
    emit(f"vLLM commands for a {card.name} card (not run here; start the judge once the policy server answers):")
    emit(f"  {policy.command()} &")
    emit(f"  {wait_for(policy.port)}")
    emit(f"  {judge_plan.command()} &")
    emit(f"  {wait_for(judge_plan.port)}")
    emit("memory arithmetic (estimates from the model shapes, not measured):")
    emit(f"  {policy.arithmetic()}")
    emit(f"  {judge_plan.arithmetic()}")
    return checks


def exit_code(checks: list[Check]) -> int:
    statuses = {c.status for c in checks}
    return 1 if "FAIL" in statuses else 3 if "SKIPPED" in statuses else 0


def preflight(pipeline_config: str = "configs/pipeline.yaml", gpu_gb: Literal[24, 40, 80] = 24,
              vllm: str = "vllm") -> None:
    """Check the real run before it spends GPU time; starts nothing, uses no GPU.

    Checks Hub access (gated included), the HarmfulQA file, the vLLM version and commands, and GPU memory per
    stage. One line per check: PASS, FAIL or SKIPPED (offline, it names what it could not check). Exit code
    0 when every check passed, 1 when any failed, 3 when none failed but some were skipped.

    Args:
        pipeline_config: the pipeline config of the run (its fit configs and evaluation section are read
            too); ``--config`` is short for it.
        gpu_gb: the card the run will use, in GB: 24, 40 or 80; sets the vLLM memory shares and the
            memory check.
        vllm: the vLLM executable (vLLM lives in its own environment; e.g. ~/vllm-env/bin/vllm).
    """
    checks = run_checks(pipeline_config, gpu_gb, vllm, print)
    code = exit_code(checks)
    counts = {s: sum(c.status == s for c in checks) for s in EXIT_CODES}
    print(f"\npreflight: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIPPED']} skipped "
          f"-> exit {code}")
    sys.stdout.flush()
    if code:
        raise SystemExit(code)
