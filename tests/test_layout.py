"""The package's folders are its architecture: subpackages form layers without a cycle, modules use only
each other's public names, and import paths and checkpoints from before the subpackages still work."""

from __future__ import annotations

import ast
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_module, write_fit_config

PACKAGE = REPO / "refusal_lightning"
FIXTURE = REPO / "tests" / "fixtures" / "pre_layout_last.ckpt"
# a module path named in a string, as the CLI's command table names each command's function
NAMED_MODULE = re.compile(r"\brefusal_lightning(?:\.[a-z_][a-z0-9_]*)+")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str:
    """The layer a module belongs to: its subpackage, or the top-level module itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "refusal_lightning"


def _resolve(name: str) -> str | None:
    """The longest prefix of a dotted name that is one of the package's modules."""
    parts = name.split(".")
    for end in range(len(parts), 1, -1):
        candidate = ".".join(parts[:end])
        base = REPO.joinpath(*candidate.split("."))
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return candidate
    return None


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, at any depth (inside functions
    too), plus the module paths its strings name (not its docstrings: mentioning a module is no dependency)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found += [(match, []) for match in NAMED_MODULE.findall(node.value)]
    return found


def _package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _layer_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in _package_modules():
        source = _part(_module_name(path))
        if source == "refusal_lightning":  # the package's __init__ only installs the legacy import paths
            continue
        for name, _ in _imports(path):
            target = _resolve(name) if name.startswith("refusal_lightning.") else None
            if target and _part(target) != source and _part(target) != "refusal_lightning":
                graph.setdefault(source, set()).add(_part(target))
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_subpackages_form_layers_without_a_cycle():
    graph = _layer_graph()
    assert _find_cycle(graph) is None, f"import cycle between parts: {' -> '.join(_find_cycle(graph))}"
    # the edges this test sees are real ones: the CLI's command table (strings) and function-level imports
    assert {"experiment", "serving", "hub", "evaluation", "train"} <= graph["cli"]
    assert "train" in graph["experiment"] and "models" in graph["train"]


def test_nothing_below_the_command_line_imports_it():
    users = [_module_name(p) for p in _package_modules()
             if any(_resolve(name) in ("refusal_lightning.cli", "refusal_lightning.__main__")
                    for name, _ in _imports(p) if name.startswith("refusal_lightning."))]
    assert users == ["refusal_lightning.__main__"]


def test_no_module_uses_another_modules_private_names():
    offences = []
    for path in _package_modules():
        tree = ast.parse(path.read_text())
        imported_modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("refusal_lightning"):
                offences += [f"{path.name}: from {node.module} import {a.name}"
                             for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                imported_modules |= {a.asname or a.name for a in node.names
                                     if _resolve(f"{node.module}.{a.name}") == f"{node.module}.{a.name}"}
            elif isinstance(node, ast.Import):
                imported_modules |= {a.asname for a in node.names
                                     if a.name.startswith("refusal_lightning") and a.asname}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported_modules and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                offences.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not offences, offences


def test_old_import_paths_warn_and_give_the_moved_objects():
    from refusal_lightning.defences.projection import ProjectionConfig
    from refusal_lightning.train.module import LoRASettings, RefusalLoRAModule

    with pytest.warns(DeprecationWarning, match=r"refusal_lightning\.model\.LoRASettings .*train\.module"):
        from refusal_lightning.model import LoRASettings as old_settings
    with pytest.warns(DeprecationWarning, match="defences.projection"):
        from refusal_lightning.projection import ProjectionConfig as old_projection
    with pytest.warns(DeprecationWarning):
        from refusal_lightning.model import RefusalLoRAModule as old_module  # a YAML class_path users wrote
    assert (old_settings, old_projection, old_module) == (LoRASettings, ProjectionConfig, RefusalLoRAModule)
    with pytest.raises(ModuleNotFoundError):
        import refusal_lightning.no_such_module  # noqa: F401  only moved modules have a stand-in


def test_a_checkpoint_written_before_the_move_unpickles_to_the_new_classes():
    # Written by commit 052591b (before the subpackages) from a RefusalLoRAModule built in Python, so its
    # hyper_parameters pickle LoRASettings, ProjectionConfig and AsftConfig under their old module paths.
    from refusal_lightning.defences.asft import AsftConfig
    from refusal_lightning.train.module import LoRASettings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = torch.load(FIXTURE, weights_only=False, map_location="cpu")
    assert type(full["hyper_parameters"]["lora"]) is LoRASettings
    assert type(full["hyper_parameters"]["asft"]) is AsftConfig
    assert any(issubclass(w.category, DeprecationWarning) and "refusal_lightning.model" in str(w.message)
               for w in caught)
    safe = torch.load(FIXTURE, weights_only=True, map_location="cpu")  # how Lightning loads a checkpoint
    assert safe["hyper_parameters"]["lora"].r == 8 and safe["global_step"] == 2


def test_fit_resumes_a_last_ckpt_written_before_the_move(tmp_path, tiny_model_dir):
    # The fixture: 2 steps of the tiny refusal fit (batch 16) on the tiny model built with seed 0.
    config = write_fit_config(tmp_path, tiny_model_dir, "resumed", ckpt_every=2, data={"batch_size": 16},
                              trainer={"max_steps": 4, "limit_val_batches": 0, "val_check_interval": None,
                                       "check_val_every_n_epoch": 1})
    checkpoints = tmp_path / "resumed" / "adapter" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(FIXTURE, checkpoints / "last.ckpt")
    run = run_module("fit", "--config", str(config), "--ckpt_path", "last")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Restored all states" in run.stderr
    after = torch.load(checkpoints / "epoch=0-step=4.ckpt", weights_only=False, map_location="cpu")
    assert after["global_step"] == 4  # two more steps on top of the fixture's two
    assert (tmp_path / "resumed" / "adapter" / "adapter_model.safetensors").is_file()
