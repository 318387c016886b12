"""Token ids + labels from HarmfulQA pairs, length-grouped batches, and the LightningDataModule.

Loss goes on reply tokens only: the prompt is rendered with the model's chat template and
``add_generation_prompt=True``, the full chat with the reply appended; the reply's tokens are what the
full render adds after the prompt render (checked to be a prefix, else the template is reported).

``data.mix`` mixes other sources' pairs into the training set at declared shares (``mixing.py``'s schedule):
the data-mixing defence's safe examples, or a harmful share in a benign fine-tune. ``data.task`` makes a benign
task's ``{prompt, answer}`` rows (``task_data.py``) the main data in place of HarmfulQA's pairs.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import get_args

import lightning as L
import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from refusal_lightning.train.harmfulqa import (
    SAMPLE_SOURCE,
    DataSourceError,
    Half,
    Pair,
    PromptMode,
    QuestionSplit,
    Selection,
    Thread,
    extract_pairs,
    load_records,
    normalise_question,
    record_id,
    split_records,
    training_ids,
    valid_records,
)
from refusal_lightning.train.mixing import MixError, check_fractions, mixed_order, part_counts
from refusal_lightning.train.refusal_markers import DEFAULT_REFUSAL_MARKERS
from refusal_lightning.train.task_data import TaskData, check_task, load_task_rows, split_task_rows

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
    """Encoded pairs, kept as plain lists (small) and padded per batch. ``question_ids``: each pair's HarmfulQA
    record id, or a task row's position in its source (``data.task``). ``origins`` says where each came from:
    ``-1`` the main data, ``k`` the k-th part of ``data.mix``."""

    def __init__(self, examples: list[Encoded], question_ids: list[int], origins: list[int] | None = None):
        self.examples = examples
        self.question_ids = question_ids
        self.origins = [-1] * len(examples) if origins is None else origins

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


@dataclass
class MixPart:
    """Pairs of another source mixed into the training set at a fixed share (one entry of ``data.mix``)."""

    source: str
    """Data source of the part, as ``data.source`` (``sample``, a local file, a hub id)."""
    fraction: float
    """Share of the mixed training set, in [0, 1): ``round(fraction * n)`` of its ``n`` examples."""
    thread: Thread = "blue"
    """``blue``: safe replies (the data-mixing defence); ``red``: harmful ones."""
    selection: Selection = "most_indicative"
    """Reply per conversation, as ``data.selection``."""
    prompt: PromptMode | None = None
    """What precedes the reply, as ``data.prompt`` (None: the datamodule's)."""
    half: Half = "all"
    """Records of the part's training side to draw from: ``all``, or the ``defender``'s or ``attacker``'s half."""


# save_hyperparameters keeps the MixPart and TaskData objects, so a checkpoint pickles them, and Lightning
# resumes with ``weights_only=True`` (see HPARAM_CLASSES in module.py).
torch.serialization.add_safe_globals([MixPart, TaskData])


def check_mix(mix: Sequence[MixPart | dict] | None) -> list[MixPart]:
    """``data.mix`` as MixParts (dicts accepted from Python), or a MixError listing every bad part at once."""
    parts, problems = [], []
    for k, raw in enumerate(mix or []):
        try:
            part = raw if isinstance(raw, MixPart) else MixPart(**raw)
        except TypeError as exc:
            problems.append(f"data.mix[{k}]: {exc}")
            continue
        name = f"data.mix[{k}] (source '{part.source}')"
        try:
            check_fractions([part.fraction])
        except MixError:
            problems.append(f"{name}: fraction {part.fraction} is not in [0, 1)")
        for key, kind in (("thread", Thread), ("selection", Selection), ("half", Half)):
            if getattr(part, key) not in get_args(kind):
                problems.append(f"{name}: unknown {key} '{getattr(part, key)}' (one of {', '.join(get_args(kind))})")
        if part.prompt is not None and part.prompt not in get_args(PromptMode):
            problems.append(f"{name}: unknown prompt '{part.prompt}' (one of {', '.join(get_args(PromptMode))})")
        parts.append(part)
    if not problems:
        try:
            check_fractions([p.fraction for p in parts])
        except MixError:
            shares = " + ".join(f"{p.fraction:g} (data.mix[{k}], '{p.source}')" for k, p in enumerate(parts))
            problems.append(f"data.mix: the fractions {shares} sum to {sum(p.fraction for p in parts):g}; "
                            "they must leave room for the main data (sum < 1)")
    if problems:
        raise MixError("; ".join(problems))
    return parts


class HarmfulQADataModule(L.LightningDataModule):
    """HarmfulQA blue (safe) or red (harmful) replies, or a task's answers, as batches with reply-only labels."""

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
        train_half: Half = "all",
        mix: list[MixPart] | None = None,
        task: TaskData | None = None,
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
            train_half: training pairs from the whole training side (``all``), or only from the ``defender``'s
                half (directions, probes, calibration, the data-mixing defence's safe examples) or the
                ``attacker``'s (attack fits: no record the defence saw). Validation is unchanged.
            mix: other sources' pairs mixed into the training set, each a share ``fraction`` of it (e.g.
                ``[{source: ..., thread: blue, fraction: 0.1, half: defender}]``), drawn from the part's
                training side only. Every main pair comes once per epoch; a part short of its count repeats
                its pairs. The order is ``mixing.mix_schedule``'s, the same each epoch, without length grouping,
                so every 40 consecutive examples hold each part's share to within one. Validation is unchanged.
            task: a benign fine-tuning task as the main data (e.g. ``{source: .../sentiment_train.jsonl}``, or
                ``{source: stanfordnlp/sst2, format: sst2}``): each row's prompt as the user turn, its answer as
                the reply; ``val_fraction`` of its rows (by id, ``seed``) are the validation set. ``thread``,
                ``selection``, ``prompt`` and ``train_half`` then do not shape the main data (``prompt`` is still
                the mix parts' default); ``source`` only names the HarmfulQA questions held out of every mix
                part. With ``mix: [{source: ..., thread: red, fraction: p, half: attacker}]``: the harmful
                fine-tuning threat model, a benign task with a share p of harmful replies.
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
        if train_half not in get_args(Half):
            raise DataSourceError(f"data.train_half: unknown half '{train_half}' (one of {', '.join(get_args(Half))})")
        self.train_half = train_half
        self.mix = check_mix(mix)  # before anything loads
        self.task = check_task(task)
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
        # HarmfulQA's records are the main data, or (with a task) only the held-out questions every mix part
        # must leave out. One split serves blue fit, red fits, the evaluation's held-out questions
        # (heldout_questions) and the judge check.
        records = load_records(self.source)
        split = split_records(records, self.val_fraction, self.seed)
        if self.task is None:
            self.stats = self._harmfulqa_main(records, split)
        else:
            self.stats = self._task_main()
        mix_stats = self._mix_in(records, split, tokenizer) if self.mix else None
        self.stats.update(self._set_stats())
        if mix_stats is not None:
            self.stats["mix"] = mix_stats

    def _encode(self, pairs: Sequence[tuple[list[dict], str]]) -> tuple[list[Encoded], Counter]:
        """Every ``(messages, reply)`` encoded, and how many had their prompt or reply cut."""
        tokenizer = self.load_tokenizer()
        truncation: Counter = Counter()
        encoded = []
        for messages, reply in pairs:
            enc = encode_pair(tokenizer, messages, reply, self.max_length, self.template_kwargs)
            truncation["prompt_truncated"] += enc.prompt_truncated
            truncation["reply_truncated"] += enc.reply_truncated
            encoded.append(enc)
        if truncation["reply_truncated"]:
            log.warning("%d replies longer than max_length=%d were cut at the end (kept, not dropped)",
                        truncation["reply_truncated"], self.max_length)
        return encoded, truncation

    def _harmfulqa_main(self, records: list[dict], split: QuestionSplit) -> dict:
        """Set ``train_set`` and ``val_set`` to HarmfulQA's ``thread`` pairs on each side of ``split``; their stats."""
        pairs, extraction = extract_pairs(records, self.thread, self.selection, self.prompt, self.markers)
        if not pairs:
            raise DataSourceError(
                f"no usable {self.thread} pairs in data source '{self.source}': "
                f"{json.dumps(extraction.as_dict())}"
            )
        train_ids, val_ids = split.record_ids("train"), split.record_ids("val")
        if self.train_half != "all":
            train_ids = training_ids(records, self.train_half, self.val_fraction, self.seed)
        encoded, truncation = self._encode([(p.messages, p.reply) for p in pairs])

        def subset(ids: set[int]) -> PairDataset:
            idx = [i for i, p in enumerate(pairs) if p.question_id in ids]
            return PairDataset([encoded[i] for i in idx], [pairs[i].question_id for i in idx])

        self.train_set, self.val_set = subset(train_ids), subset(val_ids)
        if self.train_half != "all" and not len(self.train_set):
            raise DataSourceError(f"no {self.thread} pairs of data source '{self.source}' in the {self.train_half}'s "
                                  f"half of the training side (data.train_half)")
        return {
            "source": self.source,
            "thread": self.thread,
            "selection": self.selection,
            "prompt": self.prompt,
            **extraction.as_dict(),
            "pairs": len(pairs),
            "train_questions": len(split.train),
            "val_questions": len(split.val),
            "refusal_score_histogram": dict(sorted(Counter(p.refusal_score for p in pairs).items())),
            "share_selected_with_refusal_marker": sum(p.refusal_score > 0 for p in pairs) / len(pairs),
            "truncation": dict(truncation),
            "duplicate_questions": split.duplicates,
            "train_half": self.train_half,
            "train_half_questions": len({split.group_of[rid] for rid in train_ids}),
        }

    def _task_main(self) -> dict:
        """Set ``train_set`` and ``val_set`` to the task's rows, split by id; their stats."""
        assert self.task is not None
        rows = load_task_rows(self.task)
        train_rows, val_rows = split_task_rows(rows, self.val_fraction, self.seed)
        encoded, truncation = self._encode([([{"role": "user", "content": r["prompt"]}], r["answer"]) for r in rows])
        position = {row["id"]: i for i, row in enumerate(rows)}

        def subset(chosen: list[dict]) -> PairDataset:
            idx = [position[r["id"]] for r in chosen]
            return PairDataset([encoded[i] for i in idx], idx)

        self.train_set, self.val_set = subset(train_rows), subset(val_rows)
        return {
            "source": self.source,  # its held-out questions stay out of every mix part
            "task": {**asdict(self.task), "rows": len(rows), "train_rows": len(train_rows),
                     "val_rows": len(val_rows)},
            "truncation": dict(truncation),
        }

    def _mix_in(self, records: list[dict], split: QuestionSplit, tokenizer) -> dict:
        """Replace ``train_set`` by the main pairs (HarmfulQA's or the task's) with every ``mix`` part placed on
        the schedule; its stats. ``records`` and ``split`` are ``source``'s: its held-out questions stay out."""
        assert self.train_set is not None
        # A part from another file may repeat a held-out question under another id: its text keeps it out.
        held_out = {normalise_question(r["question"]) for r in valid_records(records)
                    if split.group_of[record_id(r)] in split.val}
        loaded = {self.source: records}
        part_pairs: list[list[Pair]] = []
        part_stats, problems = [], []
        for k, part in enumerate(self.mix):
            if part.source not in loaded:
                loaded[part.source] = load_records(part.source)
            part_records = loaded[part.source]
            ids = training_ids(part_records, part.half, self.val_fraction, self.seed)
            text = {record_id(r): normalise_question(r["question"]) for r in valid_records(part_records)}
            prompt = part.prompt or self.prompt
            found, extraction = extract_pairs(part_records, part.thread, part.selection, prompt, self.markers)
            on_side = [p for p in found if p.question_id in ids]
            kept = [p for p in on_side if text[p.question_id] not in held_out]
            if not kept:
                problems.append(f"data.mix[{k}] (source '{part.source}'): no usable {part.thread} pairs "
                                f"({part.selection}, prompt {prompt}) in the {part.half} training side: {len(found)} "
                                f"pairs in all, {len(on_side)} on that side, {len(on_side) - len(kept)} of them "
                                f"held-out questions; {json.dumps(extraction.as_dict())}")
            part_pairs.append(kept)
            part_stats.append({**asdict(part), "prompt": prompt, "available_pairs": len(kept),
                               "held_out_questions_dropped": len(on_side) - len(kept)})
        if problems:
            raise DataSourceError("; ".join(problems))

        main = self.train_set
        fractions = [p.fraction for p in self.mix]
        order = mixed_order(len(main), [len(p) for p in part_pairs], fractions, self.order_seed)
        n = len(order)
        encoded: dict[tuple[int, int], Encoded] = {}  # only the part pairs the order draws are encoded
        examples, question_ids = [], []
        for source, j in order:
            if source < 0:
                examples.append(main.examples[j])
                question_ids.append(main.question_ids[j])
                continue
            pair = part_pairs[source][j]
            if (source, j) not in encoded:
                encoded[source, j] = encode_pair(tokenizer, pair.messages, pair.reply, self.max_length,
                                                 self.template_kwargs)
            examples.append(encoded[source, j])
            question_ids.append(pair.question_id)
        self.train_set = PairDataset(examples, question_ids, [source for source, _ in order])
        for k, (stats, count) in enumerate(zip(part_stats, part_counts(n, fractions), strict=True)):
            drawn = [e for (source, _), e in encoded.items() if source == k]
            stats.update(count=count, distinct_pairs=len(drawn),
                         reply_truncated=sum(e.reply_truncated for e in drawn),
                         prompt_truncated=sum(e.prompt_truncated for e in drawn))
        return {"n": n, "main_pairs": len(main), "parts": part_stats}

    def _set_stats(self) -> dict:
        """Sizes, lengths and padding of the training set as it trains (mixed, if ``mix`` is set)."""
        assert self.train_set is not None and self.val_set is not None
        lengths = self.train_set.lengths()
        shuffle, grouped = self._train_order()
        sampler = LengthGroupedSampler(lengths, self.batch_size, self.seed, shuffle=shuffle, group_by_length=grouped)
        reply_tokens = [sum(t != IGNORE_INDEX for t in e.labels) for e in self.train_set.examples]
        return {
            "max_length": self.max_length,
            "train_pairs": len(self.train_set),
            "val_pairs": len(self.val_set),
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

    def _loader(self, dataset: PairDataset, shuffle: bool, group_by_length: bool) -> StatefulDataLoader:
        trainer = getattr(self, "trainer", None)
        replicas = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        if replicas > 1:  # a Trainer built in Python, not by the CLI (which sets it false)
            check_use_distributed_sampler(getattr(trainer._accelerator_connector, "use_distributed_sampler", False))
        # only the training order follows order_seed (validation is not shuffled)
        sampler = LengthGroupedSampler(dataset.lengths(), self.batch_size, self.order_seed if shuffle else self.seed,
                                       shuffle=shuffle,
                                       group_by_length=group_by_length, num_replicas=replicas, rank=rank)
        return StatefulDataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                                  collate_fn=collate(self.load_tokenizer().pad_token_id),
                                  num_workers=self.num_workers)

    def _train_order(self) -> tuple[bool, bool]:
        """``(shuffle, group_by_length)`` of the training order. A mixed set keeps the schedule's order:
        shuffling or length grouping would clump its parts."""
        return not self.mix, self.group_by_length and not self.mix

    def train_dataloader(self) -> StatefulDataLoader:
        assert self.train_set is not None
        shuffle, grouped = self._train_order()
        return self._loader(self.train_set, shuffle=shuffle, group_by_length=grouped)

    def val_dataloader(self) -> StatefulDataLoader:
        assert self.val_set is not None
        return self._loader(self.val_set, shuffle=False, group_by_length=self.group_by_length)

    def test_dataloader(self) -> StatefulDataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> StatefulDataLoader:
        return self.val_dataloader()
