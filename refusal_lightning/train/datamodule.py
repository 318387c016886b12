"""Token ids + labels from HarmfulQA pairs, length-grouped batches, and the LightningDataModule.

Loss goes on reply tokens only: the prompt is rendered with the model's chat template and
``add_generation_prompt=True``, the full chat with the reply appended; the reply's tokens are what the
full render adds after the prompt render (checked to be a prefix, else the template is reported).
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from refusal_lightning.train.harmfulqa import (
    SAMPLE_SOURCE,
    DataSourceError,
    Pair,
    PromptMode,
    Selection,
    Thread,
    extract_pairs,
    load_records,
    split_records,
)
from refusal_lightning.train.refusal_markers import DEFAULT_REFUSAL_MARKERS

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


class ChatTemplateError(ValueError):
    """The tokenizer's chat template does not render the prompt as a prefix of the full chat."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_truncated: bool
    reply_truncated: bool


def encode_pair(tokenizer, messages: list[dict], reply: str, max_length: int,
                template_kwargs: dict | None = None) -> Encoded:
    """Tokenize one pair with the chat template; labels are -100 everywhere but on the reply.

    The prompt is truncated from the left when the pair is too long; a reply longer than
    ``max_length - 1`` keeps its beginning and is flagged (never silently dropped).
    """
    kwargs = template_kwargs or {}
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    full_text = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": reply}], tokenize=False, **kwargs
    )
    if not full_text.startswith(prompt_text):
        name = getattr(tokenizer, "name_or_path", "?")
        raise ChatTemplateError(
            f"chat template of '{name}' does not render the generation prompt as a prefix of the chat with "
            f"the reply (template kwargs {kwargs}); reply-only labels cannot be placed"
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    reply_truncated = len(reply_ids) > max_length - 1
    if reply_truncated:
        reply_ids = reply_ids[: max_length - 1]
    budget = max_length - len(reply_ids)
    prompt_truncated = len(prompt_ids) > budget
    if prompt_truncated:
        prompt_ids = prompt_ids[len(prompt_ids) - budget:]
    return Encoded(prompt_ids + reply_ids, [IGNORE_INDEX] * len(prompt_ids) + reply_ids,
                   prompt_truncated, reply_truncated)


class PairDataset(Dataset):
    """Encoded pairs, kept as plain lists (small) and padded per batch."""

    def __init__(self, examples: list[Encoded], question_ids: list[int]):
        self.examples = examples
        self.question_ids = question_ids

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.examples[i].input_ids, "labels": self.examples[i].labels}

    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.examples]


class LengthGroupedSampler(Sampler[int]):
    """Shuffled order in which each run of ``batch_size`` indices has similar lengths.

    Mega-batches of ``mega_factor * batch_size`` random indices are sorted by length and cut into
    batches, and the full batches are shuffled; the one short batch, if any, comes last, so the
    DataLoader's ``batch_size`` cuts exactly these batches. The order is a pure function of
    (seed, epoch). Batches are dealt round-robin over ``num_replicas`` ranks (pass the trainer's world
    size; every rank gets as many batches, padded with repeats, the short one last).

    Stateful (torchdata's ``StatefulDataLoader`` saves it in the checkpoint): the epoch and the number
    of indices handed out, so a resumed fit continues the epoch it died in, in any epoch. Lightning
    calls ``set_epoch`` only after it has rebuilt the iterator from the saved state, so the epoch
    has to travel with that state.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 group_by_length: bool = True, mega_factor: int = 50, num_replicas: int = 1, rank: int = 0):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.mega_factor = mega_factor
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.yielded = 0  # indices handed out in this epoch
        self._resume_at = 0  # indices to skip at the next __iter__ (set by load_state_dict)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Rank 0's count serves every rank: mid-epoch all ranks have drawn as many full batches.
        self.epoch = state["epoch"]
        self._resume_at = state["yielded"]

    def _batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            mega = self.mega_factor * self.batch_size
            order = [i for s in range(0, len(order), mega)
                     for i in sorted(order[s:s + mega], key=lambda j: -self.lengths[j])]
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        short = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        if self.shuffle and self.group_by_length:
            rng.shuffle(batches)
        if self.num_replicas > 1:  # every rank gets the same number of batches
            pad = (-(len(batches) + len(short))) % self.num_replicas
            source = batches or short
            batches += [source[i % len(source)] for i in range(pad)]
        batches += short
        if self.num_replicas > 1:
            batches = batches[self.rank::self.num_replicas]
        return batches

    def __iter__(self) -> Iterator[int]:
        skip, self._resume_at = self._resume_at, 0
        indices = [i for batch in self._batches() for i in batch]
        if skip and skip >= len(indices):
            # Saved on the epoch's last batch: Lightning resumes with the next epoch but iterates this
            # restored iterator first, so it must already be the next epoch's.
            self.epoch, skip = self.epoch + 1, 0
            indices = [i for batch in self._batches() for i in batch]
        self.yielded = skip  # now, not at the first next(): a state taken in between must not be stale
        return self._count(indices[skip:])

    def _count(self, indices: list[int]) -> Iterator[int]:
        for i in indices:
            self.yielded += 1  # before the hand-over: a state taken after next() includes this index
            yield i

    def __len__(self) -> int:
        return sum(len(b) for b in self._batches())


class DistributedSamplerError(ValueError):
    """``use_distributed_sampler`` is on in a run whose sampler shards by rank itself."""


def check_use_distributed_sampler(enabled: bool) -> None:
    """Refuse Lightning's ``use_distributed_sampler``: it would wrap ``LengthGroupedSampler``, which already
    deals batches by rank, in a ``DistributedSampler``, so each rank would see a wrong subset."""
    if enabled:
        raise DistributedSamplerError(
            "trainer.use_distributed_sampler must be false: the length-grouped sampler deals batches to ranks "
            "itself, and Lightning's DistributedSampler around it would give each rank a wrong subset "
            "(leave it out; the CLI sets false)")


def collate(pad_id: int):
    """Dynamic padding to the longest sequence of the batch."""

    def _collate(items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            ids[row, :n] = torch.tensor(it["input_ids"])
            labels[row, :n] = torch.tensor(it["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return _collate


def padding_efficiency(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Non-pad tokens / padded tokens over the given batches."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return real / padded if padded else 1.0


def _percentiles(values: Sequence[int]) -> dict[str, int]:
    if not values:
        return {}
    ordered = sorted(values)
    return {f"p{q}": ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] for q in (5, 50, 95, 100)}


class HarmfulQADataModule(L.LightningDataModule):
    """HarmfulQA blue (safe) or red (harmful) replies as causal-LM batches with reply-only labels."""

    def __init__(
        self,
        source: str = SAMPLE_SOURCE,
        thread: Thread = "blue",
        selection: Selection = "most_indicative",
        prompt: PromptMode = "question",
        tokenizer_name_or_path: str | None = None,
        max_length: int = 512,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        seed: int = 0,
        order_seed: int | None = None,
        group_by_length: bool = True,
        num_workers: int = 0,
        enable_thinking: bool | None = False,
        refusal_markers: list[str] | None = None,
    ):
        """
        Args:
            source: ``sample`` (bundled synthetic sample), a local ``data_for_hub.json``/JSONL/parquet
                path, or a hub dataset id such as ``declare-lab/HarmfulQA``.
            thread: ``blue`` trains on safe replies (the refusal LoRA), ``red`` on harmful ones (attacks).
            selection: reply per conversation: ``most_indicative`` (blue: most refusal markers; red: fewest;
                ties -> longer), ``last``, ``all`` assistant replies, or ``non_refusal``: every reply without
                a refusal marker (with ``thread: blue``, the benign replies the drift null trains on).
            prompt: what precedes the reply: the record's ``question``, the preceding human ``turn``, or the
                whole ``history`` up to the reply.
            tokenizer_name_or_path: tokenizer to use; linked to ``model.model_name_or_path`` by the CLI.
            max_length: tokens per example; prompts are cut from the left, replies never dropped.
            batch_size: examples per batch (per device).
            val_fraction: share of question ids held out for validation (split by question, seeded).
            seed: seed of the split and of the batch order.
            order_seed: seed of the training batch order only (None: ``seed``). The sweep's seeds change it,
                and the split (the held-out questions every model is evaluated on) stays put.
            group_by_length: batch similar lengths together (less padding).
            num_workers: dataloader worker processes.
            enable_thinking: passed to the chat template (Qwen3: False renders an empty think block);
                None passes nothing.
            refusal_markers: markers scoring replies for ``most_indicative`` and ``non_refusal``; default: the
                built-in selection list.
        """
        super().__init__()
        self.save_hyperparameters()
        self.source = source
        self.thread = thread
        self.selection = selection
        self.prompt = prompt
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.order_seed = seed if order_seed is None else order_seed
        self.group_by_length = group_by_length
        self.num_workers = num_workers
        self.template_kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        self.markers = tuple(refusal_markers) if refusal_markers else DEFAULT_REFUSAL_MARKERS
        self.tokenizer = None
        self.train_set: PairDataset | None = None
        self.val_set: PairDataset | None = None
        self.stats: dict = {}

    def load_tokenizer(self):
        """The tokenizer (the injected one, or loaded once from ``tokenizer_name_or_path``)."""
        if self.tokenizer is None:
            if not self.tokenizer_name_or_path:
                raise ValueError("data.tokenizer_name_or_path is not set (the CLI links it to the model path)")
            from transformers import AutoTokenizer

            from refusal_lightning.models.loading import check_model_path

            self.tokenizer = AutoTokenizer.from_pretrained(check_model_path(self.tokenizer_name_or_path))
        return self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        tokenizer = self.load_tokenizer()
        records = load_records(self.source)
        pairs, extraction = extract_pairs(records, self.thread, self.selection, self.prompt, self.markers)
        if not pairs:
            raise DataSourceError(
                f"no usable {self.thread} pairs in data source '{self.source}': "
                f"{json.dumps(extraction.as_dict())}"
            )
        # Split the question groups of all valid records, not of this thread's pairs: blue fit, red fits,
        # the evaluation's held-out questions (heldout_questions) and the judge check share one split.
        split = split_records(records, self.val_fraction, self.seed)
        train_ids, val_ids = split.record_ids("train"), split.record_ids("val")
        truncation: Counter = Counter()
        encoded = {}
        for i, pair in enumerate(pairs):
            enc = encode_pair(tokenizer, pair.messages, pair.reply, self.max_length, self.template_kwargs)
            truncation["prompt_truncated"] += enc.prompt_truncated
            truncation["reply_truncated"] += enc.reply_truncated
            encoded[i] = enc
        if truncation["reply_truncated"]:
            log.warning("%d replies longer than max_length=%d were cut at the end (kept, not dropped)",
                        truncation["reply_truncated"], self.max_length)

        def subset(ids: set[int]) -> PairDataset:
            idx = [i for i, p in enumerate(pairs) if p.question_id in ids]
            return PairDataset([encoded[i] for i in idx], [pairs[i].question_id for i in idx])

        self.train_set, self.val_set = subset(train_ids), subset(val_ids)
        self.stats = self._stats(pairs, extraction.as_dict(), truncation, split.train, split.val)
        self.stats["duplicate_questions"] = split.duplicates

    def _stats(self, pairs: list[Pair], extraction: dict, truncation: Counter,
               train_ids: frozenset[int], val_ids: frozenset[int]) -> dict:
        assert self.train_set is not None and self.val_set is not None
        lengths = self.train_set.lengths()
        sampler = LengthGroupedSampler(lengths, self.batch_size, self.seed, group_by_length=self.group_by_length)
        reply_tokens = [sum(t != IGNORE_INDEX for t in e.labels) for e in self.train_set.examples]
        return {
            "source": self.source,
            "thread": self.thread,
            "selection": self.selection,
            "prompt": self.prompt,
            "max_length": self.max_length,
            **extraction,
            "pairs": len(pairs),
            "train_pairs": len(self.train_set),
            "val_pairs": len(self.val_set),
            "train_questions": len(train_ids),
            "val_questions": len(val_ids),
            "refusal_score_histogram": dict(sorted(Counter(p.refusal_score for p in pairs).items())),
            "share_selected_with_refusal_marker": sum(p.refusal_score > 0 for p in pairs) / len(pairs),
            "truncation": dict(truncation),
            "token_length_percentiles": _percentiles(lengths),
            "reply_token_percentiles": _percentiles(reply_tokens),
            "padding_efficiency": padding_efficiency(lengths, sampler._batches()),
        }

    def write_stats(self, folder: str | Path) -> Path:
        """Write ``data_stats.json`` into ``folder``."""
        path = Path(folder) / "data_stats.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.stats, indent=2) + "\n")
        return path

    def _loader(self, dataset: PairDataset, shuffle: bool) -> StatefulDataLoader:
        trainer = getattr(self, "trainer", None)
        replicas = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        if replicas > 1:  # a Trainer built in Python, not by the CLI (which sets it false)
            check_use_distributed_sampler(getattr(trainer._accelerator_connector, "use_distributed_sampler", False))
        # only the training order follows order_seed (validation is not shuffled)
        sampler = LengthGroupedSampler(dataset.lengths(), self.batch_size, self.order_seed if shuffle else self.seed,
                                       shuffle=shuffle,
                                       group_by_length=self.group_by_length, num_replicas=replicas, rank=rank)
        return StatefulDataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                                  collate_fn=collate(self.load_tokenizer().pad_token_id),
                                  num_workers=self.num_workers)

    def train_dataloader(self) -> StatefulDataLoader:
        assert self.train_set is not None
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> StatefulDataLoader:
        assert self.val_set is not None
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> StatefulDataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> StatefulDataLoader:
        return self.val_dataloader()
