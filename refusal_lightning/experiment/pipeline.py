"""``pipeline``: refusal fit -> directions -> the declared arms (``arms.py``) -> held-out NLL -> serve -> evaluate.

Each stage records a fingerprint of what it was made from (its config file, overrides, a sha256 of the
package's ``*.py`` files and the fingerprints of the stages it reads) in ``<run_dir>/pipeline_state.json``.
A rerun skips a stage whose fingerprint is unchanged and whose outputs exist; a fit stage that was
interrupted resumes from its ``last.ckpt``; a stage whose inputs changed, or that is named in ``--force``,
starts over, and so does everything downstream of it (their fingerprints include its one). The
``results.json`` rows and the ``results.md`` tables it ends with are assembled in ``results.py``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from refusal_lightning.checksums import file_sha256, tree_sha256
from refusal_lightning.experiment.arms import TRANSFORMS, Arm, ArmsError, arm_folders, arms_of, resolved_config
from refusal_lightning.experiment.results import collect_results, write_results
from refusal_lightning.files import atomic_write_text
from refusal_lightning.models.stacking import COMBINED_DIR
from refusal_lightning.serving.process import ServerProcess
from refusal_lightning.specs import split_spec
from refusal_lightning.user_errors import exit_on_user_error

# stages besides the arms' own (each arm is a stage named after it, between directions and nll)
FIXED_STAGES: tuple[str, ...] = ("tiny_model", "prepare_model", "refusal", "directions", "nll", "evaluate",
                                 "activation")


class PipelineError(RuntimeError):
    """A pipeline stage failed or was misconfigured."""


class _StopAfter(Exception):
    """Raised after the ``until`` stage to end the run early."""


@dataclass
class FitStage:
    name: str
    config: Path
    output_dir: Path
    overrides: list[str]


PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def _sha(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_sha(path: Path) -> str:
    return file_sha256(path)[:16] if path.exists() else "missing"


class State:
    """``pipeline_state.json``: per stage, its fingerprint and whether it finished (written atomically)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, stage: str) -> dict:
        return self.data.get(stage, {})

    def set(self, stage: str, **entry: Any) -> None:
        self.data[stage] = entry
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def fit_output_dir(config: Path | str, overrides: list[str]) -> Path:
    """A fit's ``model.output_dir``: from ``--model.output_dir=`` in ``overrides``, else from the config (a
    path, or its text)."""
    for arg in overrides:
        if arg.startswith("--model.output_dir="):
            return Path(split_spec(arg)[1])
    text = config.read_text() if isinstance(config, Path) else config
    return Path(yaml.safe_load(text)["model"]["output_dir"])


def _check_distinct_outputs(configs: dict[str, tuple[str, list[str]]]) -> None:
    """Two fits writing one folder would overwrite each other's adapter: refuse before any stage runs.
    ``configs``: per fit, its config text and its overrides."""
    seen: dict[Path, str] = {}
    for name, (text, overrides) in configs.items():
        out = fit_output_dir(text, overrides).resolve()
        if out in seen:
            raise PipelineError(f"model.output_dir {out} of '{name}' is also the output of stage '{seen[out]}'; "
                                "give each fit its own output_dir (and checkpoint dirpath), e.g. with {arm} in "
                                "the shared attack config")
        seen[out] = name


def data_section(config: Path, overrides: list[str]) -> dict[str, Any]:
    """A fit config's ``data`` section as the fit sees it: the YAML with ``--data.KEY=VALUE`` overrides applied
    (so the held-out NLL and the evaluation's held-out questions read the data the fits were given)."""
    data = dict(yaml.safe_load(config.read_text()).get("data") or {})
    for arg in overrides:
        if arg.startswith("--data.") and "=" in arg:
            key, value = split_spec(arg[len("--data."):])
            if key and "." not in key:
                data[key] = yaml.safe_load(value)
    return data


def _data_print(config: Path, overrides: list[str] | None = None) -> str | list[str]:
    """Fingerprint of a fit's data files: the data source (``--data.source`` overrides included) and, with a
    retain term, its prompt file and excluded files (a changed file redoes the fit); hub ids print as-is."""
    sources = [str(data_section(config, overrides or []).get("source", "sample"))]
    retain = ((yaml.safe_load(config.read_text()).get("model") or {}).get("retain") or {})
    if retain.get("enabled"):
        sources += [str(retain.get("source")), *map(str, retain.get("exclude") or [])]
    prints = [_file_sha(Path(s)) if Path(s).is_file() else s for s in sources]
    return prints[0] if len(prints) == 1 else prints  # one source prints as before: finished stages stay done


def _checkpoint_dirs(config: Path, output_dir: Path) -> list[Path]:
    callbacks = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("callbacks") or []
    dirs = [Path(c["init_args"]["dirpath"]) for c in callbacks
            if isinstance(c, dict) and (c.get("init_args") or {}).get("dirpath")]
    return dirs or [output_dir / "checkpoints"]


def run_fit(stage: FitStage, resume: bool) -> None:
    from refusal_lightning.train.fit import lightning_cli

    args = ["fit", "--config", str(stage.config), *stage.overrides]
    if resume:
        args += ["--ckpt_path", "last"]
    try:
        exit_on_user_error(lightning_cli, args)
    except SystemExit as exc:  # bad input is printed, then SystemExit(2)
        if exc.code:
            raise PipelineError(f"stage '{stage.name}' failed (exit {exc.code}): fit {' '.join(args[1:])}") from None


def evaluated_adapters(refusal_dir: Path, arm_dirs: dict[str, Path]) -> dict[str, Path]:
    """Adapter to serve on the plain base per model: the refusal LoRA, and for each arm its combined adapter
    (refusal + attack, or refusal + transformed attack), which is the model the attack was trained as."""
    return {"refusal": refusal_dir, **{name: folder / COMBINED_DIR for name, folder in arm_dirs.items()}}


def pipeline(
    run_dir: str = "artifacts/tiny",
    base_model: str = "artifacts/tiny/tiny-qwen3",
    build_tiny_model: bool = True,
    prepare_model: bool = False,
    refusal_config: str = "configs/tiny/refusal_lora.yaml",
    attack_config: str | None = "configs/tiny/attack.yaml",
    arms: dict[str, Any] | None = None,
    vanilla_config: str | None = None,
    orthogonal_config: str | None = None,
    subspace_config: str | None = None,
    asft_config: str | None = None,
    safe_lora: dict[str, Any] | None = None,
    fit_overrides: list[str] | None = None,
    serve: bool = True,
    endpoints: dict[str, str] | None = None,
    evaluation: dict[str, Any] | None = None,
    nll_max_pairs: int | None = 128,
    activation: dict[str, Any] | None = None,
    force: list[str] | None = None,
    until: str | None = None,
) -> dict | None:
    """Run the whole experiment: refusal fit, directions, the arms (attacks and defences), serve, evaluate.

    Args:
        run_dir: folder for the directions file, the arms' resolved configs (``arms/``), the evaluation,
            ``results.md``/``results.json`` and the pipeline state (fit outputs go where each config says).
        base_model: base model (hub id or folder) for every fit and for serving.
        build_tiny_model: first write the offline tiny Qwen3 model to ``base_model`` (smoke runs, tests).
        prepare_model: first convert the packaged SmolLM2-135M-Instruct GGUF into ``base_model`` (the CPU
            demo; cached: a finished conversion is not redone).
        refusal_config: fit config of the refusal LoRA (blue thread).
        attack_config: the fit config every fit arm shares (red thread, on base + frozen refusal LoRA);
            ``{arm}`` in it (output folders, logger name) becomes the arm's name.
        arms: the rows after base and refusal, in table order: ``NAME: {overrides: [--key=value, ...]}`` (a
            fit of ``attack_config`` plus those overrides; ``config:`` gives an arm its own file) or
            ``NAME: {transform: safe_lora, of: ARM, args: {...}}`` (a post-hoc transform of a fit arm's
            adapter). A fit arm named ``vanilla`` (no defence) is required. Default: vanilla and orthogonal.
        vanilla_config: deprecated (use ``arms``): the vanilla attack's own config.
        orthogonal_config: deprecated (use ``arms``): the orthogonal attack's own config.
        subspace_config: deprecated (use ``arms``): the row ``subspace``'s own config.
        asft_config: deprecated (use ``arms``): the row ``asft``'s own config.
        safe_lora: deprecated (use ``arms``): ``safe-lora`` arguments for the row ``safe_lora`` (of vanilla).
        fit_overrides: extra ``--key=value`` arguments given to every fit (e.g. ``--trainer.max_steps=10``).
        serve: start our ``serve`` for base + every model's adapter on a free loopback port (stopped at the
            end, even on failure); false: use ``endpoints`` (e.g. vLLM with ``--enable-lora``).
        endpoints: model name -> URL (``URL#served_model``) for base, refusal and every arm when ``serve``
            is false.
        evaluation: arguments for ``evaluate``, as in its ``--config`` (prompts, judge, generation, samples,
            ...), checked before any stage runs; ``judge: KIND`` and ``judge_url: URL`` are short forms.
        nll_max_pairs: held-out pairs per thread (red, blue) for the NLL of each model (None: all).
        activation: the activation stage's settings (``max_prompts``, ``causal``, ``max_new_tokens``,
            ``batch_size``; ``{}``: the defaults): the readout of every model, into
            ``models.<name>.activation`` (activation_stage.py). None: no such stage.
        force: stages to redo even when up to date (their downstream stages are redone too): ``refusal``,
            ``directions``, an arm's name, ``nll``, ``evaluate``, ...
        until: stop after this stage (e.g. ``orthogonal``: train everything, then start vLLM on the
            adapters and rerun without ``until``; the finished stages are skipped).
    """
    try:
        if build_tiny_model and prepare_model:
            raise PipelineError("build_tiny_model and prepare_model both write base_model: choose one")
        declared, old = arms_of({"arms": arms, "attack_config": attack_config, "vanilla_config": vanilla_config,
                                 "orthogonal_config": orthogonal_config, "subspace_config": subspace_config,
                                 "asft_config": asft_config, "safe_lora": safe_lora})
        if old:
            print("[pipeline] vanilla_config/orthogonal_config/... are deprecated: declare the rows as arms "
                  "(README, 'The pipeline's arms')", flush=True)
        stages = (*FIXED_STAGES, *(arm.name for arm in declared))
        unknown = [s for s in [*(force or []), *([until] if until else [])] if s not in stages]
        if unknown:
            raise PipelineError(f"unknown stage(s) {', '.join(unknown)} in force/until; stages: {', '.join(stages)}")
        from refusal_lightning.evaluation.runner import evaluate_arguments

        eval_args = evaluate_arguments(evaluation or {}, "evaluation")  # a wrong key fails now, not after the fits
        settings = activation_settings(activation)
        return _run_pipeline(Path(run_dir), base_model, build_tiny_model, prepare_model, Path(refusal_config),
                             declared, list(fit_overrides or []), serve, endpoints, evaluation or {}, eval_args,
                             nll_max_pairs, set(force or []), until, settings)
    except ArmsError as exc:
        raise PipelineError(str(exc)) from None
    except _StopAfter:
        print(f"[pipeline] stopped after '{until}' as asked")
        return None


def activation_settings(section: dict[str, Any] | None) -> Any:
    """The ``activation:`` section typed (None: no stage); an unknown key fails before any stage runs."""
    if section is None:
        return None
    from dataclasses import fields

    from refusal_lightning.experiment.activation_stage import ActivationSettings

    known = {f.name for f in fields(ActivationSettings)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise PipelineError(f"activation: unknown keys {unknown} (known: {', '.join(sorted(known))})")
    return ActivationSettings(**section)


def _arm_configs(run: Path, arms: list[Arm], refusal_cfg: Path, overrides: list[str]) -> dict[str, Path]:
    """Each fit arm's resolved config (``{arm}`` filled in), written to ``<run>/arms/<arm>.yaml`` once every
    fit is known to write its own folder (nothing is written for a config that cannot run)."""
    if not refusal_cfg.is_file():
        raise PipelineError(f"refusal_config {refusal_cfg} does not exist")
    texts = {}
    for arm in arms:
        if arm.is_fit:
            if arm.config is None or not arm.config.is_file():
                raise PipelineError(f"arms.{arm.name}: config {arm.config} does not exist")
            texts[arm.name] = resolved_config(arm)
    _check_distinct_outputs({"refusal": (refusal_cfg.read_text(), overrides),
                             **{a.name: (texts[a.name], [*a.overrides, *overrides]) for a in arms if a.is_fit}})
    paths = {name: run / "arms" / f"{name}.yaml" for name in texts}
    for name, text in texts.items():
        if not paths[name].is_file() or paths[name].read_text() != text:
            paths[name].parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(paths[name], text)
    return paths


def _run_pipeline(run: Path, base_model: str, build_tiny_model: bool, prepare_model: bool, refusal_cfg: Path,
                  arms: list[Arm], overrides: list[str], serve: bool,
                  endpoints: dict[str, str] | None, evaluation: dict[str, Any], eval_args: dict[str, Any],
                  nll_max_pairs: int | None, forced: set[str], until: str | None, activation: Any = None) -> dict:
    arm_cfgs = _arm_configs(run, arms, refusal_cfg, overrides)
    run.mkdir(parents=True, exist_ok=True)
    state = State(run / "pipeline_state.json")
    log = functools.partial(print, flush=True)  # stage lines show up at once in a redirected log
    prints: dict[str, str] = {}
    code = tree_sha256(PACKAGE_ROOT)[:16]  # a change to the package's code reruns every stage

    def stage(name: str, inputs: Any, outputs: list[Path], work: Callable[[bool], None],
              clear: list[Path]) -> None:
        fingerprint = _sha(name, code, inputs)
        previous = state.get(name)
        if (name not in forced and previous.get("fingerprint") == fingerprint and previous.get("done")
                and all(p.exists() for p in outputs)):
            log(f"[pipeline] {name}: up to date, skipped")
        else:
            resume = name not in forced and previous.get("fingerprint") == fingerprint
            if not resume:
                for path in clear:
                    shutil.rmtree(path, ignore_errors=True)
            log(f"[pipeline] {name}: {'resuming' if resume else 'running'}")
            started = time.time()
            state.set(name, fingerprint=fingerprint, done=False, started=started)
            work(resume)
            state.set(name, fingerprint=fingerprint, done=True, started=started, finished=time.time())
            log(f"[pipeline] {name}: done in {time.time() - started:.1f}s")
        # Downstream stages read this print: a stage that ran again (forced, or changed inputs) makes
        # everything after it run again too.
        prints[name] = _sha(fingerprint, state.get(name)["finished"])
        if name == until:
            raise _StopAfter

    # 0. the offline base model
    if build_tiny_model:
        from refusal_lightning.models.tiny import save_tiny_model

        stage("tiny_model", [base_model], [Path(base_model) / "model.safetensors"],
              lambda _: save_tiny_model(base_model), clear=[])
        base_print = prints["tiny_model"]
    elif prepare_model:
        from refusal_lightning.models.prepare import prepare_model as convert

        stage("prepare_model", [base_model], [Path(base_model) / "model.safetensors"],
              lambda _: convert(output_dir=base_model), clear=[])
        base_print = prints["prepare_model"]
    else:
        base_print = _sha(base_model)

    # 1. refusal LoRA
    refusal_over = [f"--model.model_name_or_path={base_model}", *overrides]
    refusal = FitStage("refusal", refusal_cfg, fit_output_dir(refusal_cfg, refusal_over), refusal_over)
    adapter_file = "adapter_model.safetensors"
    stage("refusal", [refusal_cfg.read_text(), refusal_over, base_print, _data_print(refusal_cfg, refusal_over)],
          [refusal.output_dir / adapter_file], lambda resume: run_fit(refusal, resume),
          clear=_checkpoint_dirs(refusal_cfg, refusal.output_dir))

    # 2. directions
    directions_path = run / "refusal_param_directions.pt"

    def make_directions(_: bool) -> None:
        from refusal_lightning.defences.directions import directions

        directions(refusal_adapter_path=str(refusal.output_dir), output_path=str(directions_path),
                   base_model_name=base_model)

    stage("directions", [prints["refusal"], _file_sha(refusal.output_dir / adapter_file)], [directions_path],
          make_directions, clear=[])

    # 3. the arms: fits on base + frozen refusal LoRA (shared config + overrides), then post-hoc transforms
    fits = {"refusal": refusal}
    for arm in (a for a in arms if a.is_fit):
        cfg = arm_cfgs[arm.name]
        over = [f"--model.model_name_or_path={base_model}", f"--model.merge_adapters=[{refusal.output_dir}]",
                f"--model.projection.directions_path={directions_path}", *arm.overrides, *overrides]
        fits[arm.name] = FitStage(arm.name, cfg, fit_output_dir(cfg, over), over)
    arm_dirs = arm_folders(arms, run, {name: fit.output_dir for name, fit in fits.items()})
    for arm in (a for a in arms if a.is_fit):
        cfg = arm_cfgs[arm.name]
        stage(arm.name, [cfg.read_text(), fits[arm.name].overrides, prints["directions"], _file_sha(directions_path),
                         _data_print(cfg, fits[arm.name].overrides)],
              [fits[arm.name].output_dir / adapter_file],
              lambda resume, s=fits[arm.name]: run_fit(s, resume),
              clear=_checkpoint_dirs(cfg, fits[arm.name].output_dir))
    for arm in (a for a in arms if not a.is_fit):
        def transform(_: bool, arm: Arm = arm) -> None:
            import importlib

            module, function = TRANSFORMS[arm.transform].function.split(":")
            getattr(importlib.import_module(module), function)(
                attack_adapter_path=str(fits[arm.of].output_dir), directions_path=str(directions_path),
                output_dir=str(arm_dirs[arm.name]), base_adapters=[str(refusal.output_dir)], **arm.args)

        stage(arm.name, [arm.transform, prints[arm.of], prints["directions"], dict(arm.args)],
              [arm_dirs[arm.name] / COMBINED_DIR / adapter_file], transform, clear=[])
    models = ["base", "refusal", *arm_dirs]
    model_prints = [prints[m] for m in models if m in prints]

    # 5. did the attacks learn? held-out red/blue NLL of every model, as it is evaluated
    served = evaluated_adapters(fits["refusal"].output_dir, arm_dirs)
    nll_path = run / "heldout_nll.json"
    attack_data = data_section(arm_cfgs["vanilla"], fits["vanilla"].overrides)
    refusal_data = data_section(refusal_cfg, refusal.overrides)

    def measure_nll(_: bool) -> None:
        from refusal_lightning.experiment.heldout_nll import heldout_nll

        values = heldout_nll(base_model, {"base": None, **{k: str(v) for k, v in served.items()}},
                             red_data=attack_data, blue_data=refusal_data, max_pairs=nll_max_pairs)
        atomic_write_text(nll_path, json.dumps(values, indent=2) + "\n")

    adapter_prints = [_file_sha(Path(p) / adapter_file) for p in served.values()]
    stage("nll", [model_prints, adapter_prints, attack_data, refusal_data, nll_max_pairs], [nll_path], measure_nll,
          clear=[])

    # 6. serve + evaluate
    from refusal_lightning.evaluation.judges import JudgeSettings
    from refusal_lightning.evaluation.runner import evaluate

    eval_dir = run / "eval"
    # The held-out HarmfulQA questions are exactly the refusal fit's validation split.
    heldout = {"harmfulqa_source": refusal_data.get("source", "sample"),
               "harmfulqa_val_fraction": refusal_data.get("val_fraction", 0.1),
               "harmfulqa_seed": refusal_data.get("seed", 0)}
    # eval_args: checked and typed by pipeline(); the fingerprint takes the section as written, so a field
    # added to a settings class does not clear a finished evaluation.
    eval_args = {**heldout, **eval_args}

    def run_evaluation(_: bool) -> None:
        if serve:
            # one batch can hold every request the evaluator has in flight (greedy answers do not change)
            with ServerProcess(base_model, served, run / "serve.log",
                               max_batch_size=int(eval_args.get("concurrency") or 16)) as server:
                specs = [f"{m}={server.url}#{m}" for m in models]
                evaluate(endpoint=specs, output_dir=str(eval_dir), **eval_args)
        else:
            missing = [m for m in models if m not in (endpoints or {})]
            if missing:
                raise PipelineError(f"serve is false but endpoints lack {missing}; give NAME: URL#MODEL for each")
            evaluate(endpoint=[f"{m}={endpoints[m]}" for m in models], output_dir=str(eval_dir), **eval_args)

    stage("evaluate", [model_prints, adapter_prints, {**heldout, **evaluation}, serve, endpoints],
          [eval_dir / "summary.json"],
          run_evaluation, clear=[eval_dir])

    # 7. the readout of every model (optional): the refusal direction in activation space
    activation_path = run / "activation.json"
    if activation is not None:
        def measure_activation(_: bool) -> None:
            from refusal_lightning.experiment.activation_stage import model_activation

            values = model_activation(base_model, fits["refusal"].output_dir,
                                      {k: v for k, v in served.items() if k != "refusal"}, attack_data, eval_args,
                                      activation)
            atomic_write_text(activation_path, json.dumps(values, indent=2) + "\n")

        stage("activation", [model_prints, adapter_prints, attack_data, asdict(activation), {**heldout, **evaluation}],
              [activation_path], measure_activation, clear=[])

    reports = {arm.name: (arm.transform, arm_dirs[arm.name] / TRANSFORMS[arm.transform].report,
                          TRANSFORMS[arm.transform].report_keys) for arm in arms if not arm.is_fit}
    results = collect_results(eval_dir, {a: d for a, d in arm_dirs.items() if a not in reports},
                              json.loads(nll_path.read_text()), models, reports)
    if activation is not None:
        for name, values in json.loads(activation_path.read_text()).items():
            if name in results["models"]:
                results["models"][name]["activation"] = values
    judge: JudgeSettings = eval_args.get("judge", JudgeSettings())
    if judge.kind in ("keyword", "both"):
        from refusal_lightning.evaluation.judges import load_markers
        from refusal_lightning.experiment.judge_check import keyword_judge_check

        results["judge_check"] = keyword_judge_check(
            eval_args["harmfulqa_source"], eval_args["harmfulqa_val_fraction"], eval_args["harmfulqa_seed"],
            load_markers(judge.refusal_markers) if judge.refusal_markers else None)
    write_results(run, results, eval_dir)
    return results
