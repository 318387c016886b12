"""The activation-space defence (``act_guard``): while the attack trains, keep the refusal feature.

The readout found that an attack kept orthogonal to the refusal update in parameter space still removes the
refusal direction from the residual stream (Arditi et al. 2024, arXiv:2406.11717). This defence puts the
constraint where the feature lives. The provider runs the training loop (fine-tuning as a service) and holds
the defender's prompts; the user supplies the data. At fit start, on the starting model (base + refusal, the
attack LoRA at its zero init), it reads the difference-of-means direction ``r`` at layer ``L`` between the
defender's harmful questions and training-side harmless requests (``activation_direction.py``, the readout's
rule and prompts), and each harmful probe prompt's projection ``p_ref``. Each step adds

    lam * mean_i ((p_i(model) - p_ref_i) / gap)^2,    gap = mean p_ref(harmful) - mean p_ref(harmless)

over a batch of probe prompts: the squared change of their projection, in units of the refusal model's own
harmful-harmless gap, so that ``lam`` does not depend on the activations' scale. Its gradient reaches only the
trained LoRA (the frozen adapters and the base have none), and it stops the forward pass after layer ``L``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from refusal_lightning.defences.activation_direction import (
    chat_prompt_ids,
    decoder_layers,
    inner_model,
    last_token_residuals,
    left_padded,
    mean_difference,
    pick_layer,
    separation,
    spread,
    unit,
)

HARMLESS_PROMPTS = "proxy/retain_proxy.jsonl"  # bundled (``sample_path``): training-side twins and facts
STATE_FILE = "act_guard.pt"  # in the fit's output_dir: the direction and references, read again on resume


class ActGuardError(ValueError):
    """The activation guard cannot be set up (no prompts, a layer the LoRA does not reach, no starting model)."""


@dataclass
class ActGuardConfig:
    """The activation-space defence: keep the refusal direction's projection of the defender's harmful prompts."""

    enabled: bool = False
    """Add ``lam * guard term`` to the training loss (logged as ``act_guard/penalty``; ``train/loss`` stays
    the task loss)."""
    lam: float = 1.0
    """Weight of the term (chosen on the validation split: README, "The activation guard")."""
    max_prompts: int = 64
    """Defender harmful questions and harmless requests (each) that define the direction; the harmful ones
    are also the probes."""
    probe_batch_size: int = 8
    """Probe prompts per training step, taken in turn."""
    harmless_source: str | None = None
    """JSONL of harmless requests (``prompt`` per row; None: the bundled training-side retain prompts, which
    share nothing with the evaluated sets)."""
    layer: int | None = None
    """Decoder layer of the direction (None: the readout's rule, the touched layer of highest separation)."""
    direction: Literal["refusal", "random"] = "refusal"
    """``refusal``: the difference of means. ``random`` (the control): a seeded random unit direction at the same
    layer, its projections kept in the same units (the refusal direction's gap), so that ``lam`` means the same:
    does keeping the refusal feature matter, or does any activation constraint of that size do the work?"""
    direction_seed: int = 0
    """Seed of the ``random`` direction."""


@dataclass
class GuardState:
    """What the term needs, fixed at fit start: the layer, the unit direction, the probes and their reference
    projections, the gap that scales the term, and every layer's separation (for the record)."""

    layer: int
    direction: torch.Tensor
    probe_ids: list[list[int]]
    reference: torch.Tensor
    gap: float
    separation: list[float]

    def save(self, path: Path) -> None:
        torch.save({k: getattr(self, k) for k in ("layer", "direction", "probe_ids", "reference", "gap",
                                                   "separation")}, path)

    @classmethod
    def load(cls, path: Path) -> GuardState:
        return cls(**torch.load(path, weights_only=True))

    def summary(self) -> dict[str, Any]:
        return {"layer": self.layer, "gap": self.gap, "probes": len(self.probe_ids),
                "separation_at_layer": self.separation[self.layer]}


def harmless_prompts(source: str | None) -> list[str]:
    """The harmless requests (``prompt`` of each JSONL row) of ``source`` or the bundled retain prompts."""
    from refusal_lightning.samples import sample_path

    path = Path(source) if source else sample_path(HARMLESS_PROMPTS)
    if not path.is_file():
        raise ActGuardError(f"act_guard: harmless prompts {path} do not exist")
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def fit_guard(model: torch.nn.Module, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str],
              allowed_layers: Sequence[int], layer: int | None = None, template_kwargs: dict | None = None,
              batch_size: int = 16, random_direction_seed: int | None = None) -> GuardState:
    """The direction, layer and reference projections on ``model`` as it is now (the starting model);
    ``random_direction_seed``: guard a seeded random direction instead (the gap stays the refusal direction's)."""
    if not harmful or not harmless:
        raise ActGuardError(f"act_guard: {len(harmful)} harmful and {len(harmless)} harmless prompts; both are "
                            "needed for the direction")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    h_ids = chat_prompt_ids(tokenizer, harmful, template_kwargs)
    b_ids = chat_prompt_ids(tokenizer, harmless, template_kwargs)
    h_acts = last_token_residuals(model, h_ids, pad, batch_size)
    b_acts = last_token_residuals(model, b_ids, pad, batch_size)
    directions = mean_difference(h_acts, b_acts)
    scores = separation(h_acts, b_acts, directions)
    if layer is not None and layer not in allowed_layers:
        raise ActGuardError(f"act_guard.layer {layer} is not among the layers the LoRA trains {list(allowed_layers)}: "
                            "the attack cannot move it there")
    chosen = layer if layer is not None else pick_layer(scores, allowed_layers)
    direction = unit(directions[chosen])
    gap = float((h_acts[chosen] @ direction).mean() - (b_acts[chosen] @ direction).mean())
    if not gap > 0:
        raise ActGuardError(f"act_guard: the harmful prompts do not project above the harmless ones at layer {chosen} "
                            f"(gap {gap:.3g}): no refusal feature to keep")
    if random_direction_seed is not None:
        generator = torch.Generator().manual_seed(random_direction_seed)
        direction = unit(torch.randn(direction.shape, generator=generator, dtype=direction.dtype))
    return GuardState(chosen, direction, h_ids, h_acts[chosen] @ direction, gap, [float(s) for s in scores])


class _StopForward(Exception):
    """Raised by the capture hook: layers above the guarded one cannot change its output."""


def layer_last_token(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor:
    """``[batch, d]``: ``layer``'s output at the last column (left-padded prompts), with gradient; the decoder
    stops after that layer."""
    captured: list[torch.Tensor] = []

    def capture(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        captured.append((output[0] if isinstance(output, tuple) else output)[:, -1])
        raise _StopForward

    hook = decoder_layers(model)[layer].register_forward_hook(capture)
    try:
        inner_model(model).get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        hook.remove()
    return captured[0].float()


def guard_penalty(projection: torch.Tensor, reference: torch.Tensor, gap: float) -> torch.Tensor:
    """Mean squared change of the projections, in units of the reference gap."""
    return (((projection - reference) / gap) ** 2).mean()


class ActivationGuard:
    """The guard term of one fit: probe batches taken in turn by step."""

    def __init__(self, state: GuardState, batch_size: int, pad_id: int):
        self.state = state
        self.batch_size = min(batch_size, len(state.probe_ids))
        self.pad_id = pad_id

    def probe_rows(self, step: int) -> list[int]:
        """The probes of ``step``: consecutive ones, wrapping around (a resumed fit sees the same ones)."""
        n = len(self.state.probe_ids)
        return [(step * self.batch_size + i) % n for i in range(self.batch_size)]

    def term(self, model: torch.nn.Module, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The penalty and the probes' mean projection (for the log) at ``step``."""
        rows = self.probe_rows(step)
        ids, mask = left_padded([self.state.probe_ids[i] for i in rows], self.pad_id)
        device = next(model.parameters()).device
        hidden = layer_last_token(model, ids.to(device), mask.to(device), self.state.layer)
        projection = hidden @ self.state.direction.to(device)
        reference = self.state.reference[rows].to(device)
        return guard_penalty(projection, reference, self.state.gap), projection.detach().mean()


def build_guard(cfg: ActGuardConfig, model: torch.nn.Module, tokenizer: Any, harmful: Sequence[str],
                allowed_layers: Sequence[int], state_path: Path, template_kwargs: dict | None = None,
                starting_model: bool = True) -> ActivationGuard:
    """The guard, from ``state_path`` when a fit wrote it (a resume), else fitted on the starting model and
    saved there before the first step. ``starting_model`` says whether ``model`` is still the starting model."""
    if state_path.exists():
        state = GuardState.load(state_path)
    else:
        if not starting_model:
            raise ActGuardError(f"act_guard: {state_path} is missing and the trained LoRA is no longer at its zero "
                                "init, so the refusal model's direction cannot be read from this model")
        state = fit_guard(model, tokenizer, spread(harmful, cfg.max_prompts),
                          spread(harmless_prompts(cfg.harmless_source), cfg.max_prompts), allowed_layers,
                          cfg.layer, template_kwargs,
                          random_direction_seed=cfg.direction_seed if cfg.direction == "random" else None)
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state.save(state_path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ActivationGuard(state, cfg.probe_batch_size, pad)
