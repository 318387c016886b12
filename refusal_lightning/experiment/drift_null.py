"""The drift null: how far a LoRA that learned nothing harmful moves along the refusal update.

An attack's ``drift/cos`` (``projection_stats.json``) is the cosine between its update and the refusal update
``dW_r``. Its Gaussian chance level ``drift/cos_chance`` (E|cos| for isotropic Gaussian factors of the attack's
shapes) is a weak null: trained LoRA updates are not isotropic (issue 22, "Controls"). The stronger null is a
LoRA trained with the attack's recipe on *benign* replies only: the attack config with
``--data.thread=blue --data.selection=non_refusal`` (on base + the same frozen refusal LoRA). Its own
``drift/cos`` is then ``cos(dW_r, dW_benign)``, and an attack's drift means something only above it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

STATS_FILE = "projection_stats.json"
# the benign fit's overrides of the attack config (a sweep declares them; README "Reading the report")
BENIGN_OVERRIDES = ("--data.thread=blue", "--data.selection=non_refusal")


class DriftNullError(ValueError):
    """The benign LoRA's folder cannot give the drift null (every problem in the message)."""


def drift_null(benign_adapter_dir: str | Path) -> dict[str, float]:
    """``{"cos_gaussian": E|cos| of Gaussian factors, "cos_benign_lora": |cos(dW_r, dW_benign)|}``.

    Args:
        benign_adapter_dir: output folder of the benign fit (the attack's recipe on benign replies), whose
            ``projection_stats.json`` holds ``drift/cos`` and ``drift/cos_chance`` (any fit with a directions
            file writes it; the projection need not be enabled).
    """
    path = Path(benign_adapter_dir).expanduser() / STATS_FILE
    if not path.is_file():
        raise DriftNullError(f"no {STATS_FILE} in '{benign_adapter_dir}': the benign LoRA's fit writes it when "
                             "its config has model.projection.directions_path (as the attack configs do)")
    try:
        stats = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DriftNullError(f"{path} is not JSON: {exc}") from exc
    values = {key: stats.get(key) for key in ("drift/cos", "drift/cos_chance")}
    bad = [f"{key} is {value!r}" for key, value in values.items()
           if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)]
    if bad:
        raise DriftNullError(f"{path} cannot give the drift null: " + "; ".join(bad) + " (want finite numbers)")
    return {"cos_gaussian": float(values["drift/cos_chance"]), "cos_benign_lora": abs(float(values["drift/cos"]))}
