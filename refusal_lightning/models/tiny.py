"""A deterministic tiny Qwen3-architecture model and tokenizer, built offline.

This is the embedded default for the demo and the tests: no hub access, the same seed gives
byte-identical files. The tokenizer is a byte-level BPE trained in-process on the bundled samples,
with Qwen's special tokens and a chat template that mirrors Qwen3's (including ``enable_thinking``),
so the data code exercises the same prompt/reply boundary it meets on the real model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from refusal_lightning.samples import sample_path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Mirrors Qwen3's template for plain chats: the last assistant turn after the last user query gets an
# (empty) think block, and enable_thinking=false adds the same empty block to the generation prompt,
# so a prompt render is a prefix of the full render.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_query = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' and loop.index0 > ns.last_query -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def _corpus() -> Iterator[str]:
    """Every text in the bundled samples, in file order (determinism depends on it)."""
    for record in json.loads(sample_path("harmfulqa_sample.json").read_text()):
        yield record["question"]
        for thread in ("blue_conversations", "red_conversations"):
            for conv in (record.get(thread) or {}).values():
                for turn in conv or []:
                    yield turn["value"]
    for line in sample_path("sorry_bench_sample.jsonl").read_text().splitlines():
        for turn in json.loads(line)["turns"]:
            if turn:
                yield turn
    yield "system user assistant Sure, here is the placeholder procedure. I'm sorry, but I cannot help."


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 1024):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with Qwen's specials and a Qwen3-style template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus if corpus is not None else _corpus()), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        padding_side="right",
    )


def build_model(tokenizer, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
                model_vocab_size: int | None = None):
    """A randomly initialised ``Qwen3ForCausalLM``; the same seed gives the same weights.
    ``model_vocab_size``: embedding rows (default: the tokenizer's; larger for a real-vocabulary head)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=model_vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = [config.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny_model(output_dir: str | Path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                    vocab_size: int = 1024, model_vocab_size: int | None = None) -> Path:
    """Build the tiny model + tokenizer and ``save_pretrained`` both into ``output_dir``.

    Args:
        output_dir: folder to write (created); loadable with ``AutoModelForCausalLM``/``AutoTokenizer``.
        seed: weight-init seed; the same seed gives byte-identical weights.
        hidden_size: model width (64 for tests and the demo; 512 for the ``cpu-small`` benchmark).
        num_layers: decoder layers.
        vocab_size: BPE vocabulary size, special tokens included.
        model_vocab_size: the model's embedding rows, if more than the tokenizer's (the benchmark's
            real-vocabulary head; the tokenizer's ids index the first rows).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size=vocab_size)
    model = build_model(tokenizer, seed=seed, hidden_size=hidden_size, num_layers=num_layers,
                        num_heads=max(4, hidden_size // 64), num_kv_heads=max(2, hidden_size // 128),
                        model_vocab_size=model_vocab_size)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_model(output_dir: str = "artifacts/tiny-qwen3", seed: int = 0, hidden_size: int = 64,
               num_layers: int = 2, vocab_size: int = 1024) -> str:
    """Write the offline tiny Qwen3 model and tokenizer (the demo's and tests' base model).

    Args:
        output_dir: where to write the model folder.
        seed: weight-init seed (same seed -> byte-identical weights).
        hidden_size: model width.
        num_layers: decoder layers.
        vocab_size: BPE vocabulary size.
    """
    path = save_tiny_model(output_dir, seed=seed, hidden_size=hidden_size, num_layers=num_layers,
                           vocab_size=vocab_size)
    print(f"tiny Qwen3 model written to {path}")
    return str(path)
