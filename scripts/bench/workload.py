"""What every runner trains: the random-weight model, the fixed-shape data rows, the LoRA and a directions file.

Every model is a Qwen3-architecture model with random weights, built in-process by ``tiny.py`` (or from
``Qwen3Config`` for Qwen3-0.6B's exact shape); nothing is downloaded.

Data. The bundled HarmfulQA sample is encoded by the data module (red thread, chat template, reply-only
labels). Its pairs are shorter than the presets' sequence length, so consecutive pairs are concatenated
and cut into rows of exactly ``seq`` tokens: every batch is ``batch x seq`` with no padding, for every
runner, so non-pad tokens/s is ``batch * seq / step time``. The padding a real epoch would carry is
reported separately as ``padding_efficiency`` (the data module's length-grouped batches of the sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.presets import LORA_ALPHA, LORA_DROPOUT, LORA_R, QWEN3_VOCAB, THREAD, Preset


def build_base_model(preset: Preset, folder: Path, device: torch.device) -> Path:
    """Write the preset's random-weight Qwen3 model + the tiny tokenizer into ``folder`` (reused if there)."""
    if (folder / "config.json").exists():
        return folder
    from refusal_lightning.models.tiny import build_tokenizer, save_tiny_model

    if preset.vocab_size is not None:
        return _save_wide_vocab_model(folder, preset)
    if not preset.real_shape:
        return save_tiny_model(folder, seed=0, hidden_size=preset.hidden_size, num_layers=preset.num_layers)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Qwen/Qwen3-0.6B's config.json shape; the tiny tokenizer's ids (< 1024) are a subset of the vocab.
    config = Qwen3Config(vocab_size=QWEN3_VOCAB, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def _save_wide_vocab_model(folder: Path, preset: Preset) -> Path:
    """tiny.py's model at ``preset``'s width and depth with ``preset.vocab_size`` (tied embeddings, as
    Qwen3-0.6B), random fp32 weights; the tiny tokenizer's ids (< 1024) index the first rows."""
    from refusal_lightning.models.tiny import save_tiny_model

    return save_tiny_model(folder, seed=0, hidden_size=preset.hidden_size, num_layers=preset.num_layers,
                           model_vocab_size=preset.vocab_size)


def lora_config():
    """The LoRA every runner trains (PEFT ``LoraConfig`` on all linear layers)."""
    from peft import LoraConfig

    from refusal_lightning.train.module import ALL_LINEAR

    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=list(ALL_LINEAR),
                      task_type="CAUSAL_LM")


def make_directions(model_dir: Path, workdir: Path, dtype: str) -> Path:
    """A 'refusal' adapter (a fresh LoRA whose zero-initialised ``B`` is perturbed) and its directions file."""
    out = workdir / "refusal_param_directions.pt"
    if out.exists():
        return out
    from peft import get_peft_model

    from refusal_lightning.defences.directions import directions
    from refusal_lightning.models.loading import load_causal_lm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = get_peft_model(load_causal_lm(str(model_dir), dtype=dtype), lora_config())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
    adapter = workdir / "refusal_lora"
    model.save_pretrained(adapter)
    directions(str(adapter), str(out), base_model_name=str(model_dir))
    return out


@dataclass
class BenchData:
    """Fixed-shape training rows and the sample's padding statistics."""

    rows: list[dict[str, list[int]]]
    pad_id: int
    padding: dict[str, Any]


def build_data(model_dir: Path, preset: Preset, n_rows: int) -> BenchData:
    """Encode the bundled sample with the data module, then concatenate pairs into ``seq``-token rows."""
    from refusal_lightning.train.datamodule import HarmfulQADataModule, LengthGroupedSampler, padding_efficiency

    padding: dict[str, Any] = {"batch_size": preset.batch, "max_length": preset.seq}
    encoded = None
    for thread in ("red", "blue"):
        dm = HarmfulQADataModule(source="sample", thread=thread, tokenizer_name_or_path=str(model_dir),
                                 max_length=preset.seq, batch_size=preset.batch, group_by_length=True)
        dm.setup("fit")
        lengths = dm.train_set.lengths()
        ungrouped = LengthGroupedSampler(lengths, preset.batch, seed=0, group_by_length=False)._batches()
        padding[thread] = {"grouped": dm.stats["padding_efficiency"],
                           "ungrouped": padding_efficiency(lengths, ungrouped), "train_pairs": len(lengths),
                           "token_length_percentiles": dm.stats["token_length_percentiles"]}
        if thread == THREAD:
            encoded, pad_id = dm.train_set.examples, dm.tokenizer.pad_token_id
    assert encoded
    ids: list[int] = []
    labels: list[int] = []
    rows = []
    i = 0
    while len(rows) < n_rows:  # repeat the sample as often as needed
        ex = encoded[i % len(encoded)]
        ids += ex.input_ids
        labels += ex.labels
        i += 1
        while len(ids) >= preset.seq and len(rows) < n_rows:
            rows.append({"input_ids": ids[:preset.seq], "labels": labels[:preset.seq]})
            ids, labels = ids[preset.seq:], labels[preset.seq:]
    return BenchData(rows=rows, pad_id=pad_id, padding=padding)
