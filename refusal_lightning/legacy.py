"""Import paths from before the package had subpackages, kept working with a deprecation warning.

User code, YAML ``class_path``s and checkpoints written before the move name modules such as
``refusal_lightning.model`` or ``refusal_lightning.projection``; Lightning pickles ``LoRASettings``,
``ProjectionConfig`` and ``AsftConfig`` into a checkpoint's ``hyper_parameters`` under those paths. A
finder on ``sys.meta_path`` (installed by the package's ``__init__``) answers each old path with a stand-in
module whose attributes come from the new module, warning ``DeprecationWarning`` on first use of each.
No file is left at an old path, so the tree shows only the new layout.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

# old module -> its home now (relative to the package)
MOVED = {
    "alignment": "defences.alignment", "asft": "defences.asft", "directions": "defences.directions",
    "lowrank": "defences.lowrank", "projection": "defences.projection", "projector": "defences.projector",
    "safe_lora": "defences.safe_lora",
    "heldout_nll": "experiment.heldout_nll", "judge_check": "experiment.judge_check",
    "pipeline": "experiment.pipeline", "results": "experiment.results", "results_plot": "experiment.results_plot",
    "hub": "hub.push", "model_card": "hub.model_card",
    "loading": "models.loading", "prepare_model": "models.prepare", "stacking": "models.stacking",
    "tiny": "models.tiny",
    "http_json": "serving.http_json", "serve": "serving.server", "serve_backend": "serving.backend",
    "serve_process": "serving.process", "serve_request": "serving.request",
    "chunked_loss": "train.chunked_loss", "datamodule": "train.datamodule", "harmfulqa": "train.harmfulqa",
    "inputs": "train.inputs", "model": "train.module", "progress": "train.progress",
    "refusal_markers": "train.refusal_markers",
}
PACKAGE = __name__.rpartition(".")[0]


class MovedModule(types.ModuleType):
    """Stands at an old import path; every attribute is the new module's, with a deprecation warning."""

    def __init__(self, old: str, new: str):
        super().__init__(old, f"Moved to {new}; this path is deprecated.")
        self.__dict__["_new"] = new

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        new = self.__dict__["_new"]
        value = getattr(importlib.import_module(new), name)
        warnings.warn(f"{self.__name__}.{name} is deprecated: import it from {new}", DeprecationWarning, stacklevel=2)
        return value


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path of :data:`MOVED` and loads a :class:`MovedModule` for it."""

    def find_spec(self, fullname: str, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != PACKAGE or name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return MovedModule(spec.name, f"{PACKAGE}.{MOVED[spec.name.rpartition('.')[2]]}")

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (after the normal finders: a real module always wins)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())


def old_paths(obj: type) -> list[str]:
    """The dotted paths under which ``obj`` was importable before the move (``refusal_lightning.model.LoRASettings``
    for ``refusal_lightning.train.module.LoRASettings``): what a pickle written then names."""
    return [f"{PACKAGE}.{old}.{obj.__qualname__}" for old, new in MOVED.items()
            if f"{PACKAGE}.{new}" == obj.__module__]
