"""The retain term on the tiny model: its loss equals the dense value, its gradient reaches only the trained
LoRA, weight 0 reproduces the fit without it, and its prompts never overlap an evaluated set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO, assert_same_adapter, run_module, write_fit_config

from refusal_lightning.train.retain import (
    RetainConfig,
    RetainSourceError,
    check_retain_config,
    load_retain_prompts,
    normalise,
    prompt_file_texts,
)
from refusal_lightning.train.retain_answers import RetainBatches, cached_base_answers, generate_base_answers

PROXY = REPO / "refusal_lightning/data/proxy"
PROMPTS = ["What is the capital of France?", "Name a primary colour.", "How many legs has a spider?",
           "What do bees make?", "Who wrote Hamlet?", "What is two plus two?"]


def _prompt_file(folder: Path, prompts: list[str] = PROMPTS) -> Path:
    path = folder / "retain.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def _module(model_dir: Path, folder: Path, kind: str, loss_impl: str = "chunked"):
    from refusal_lightning.train.module import LoRASettings, RefusalLoRAModule

    module = RefusalLoRAModule(model_name_or_path=str(model_dir), output_dir=str(folder / "out"),
                               lora=LoRASettings(r=4, alpha=8, dropout=0.0), loss_impl=loss_impl, loss_chunk_size=5,
                               retain=RetainConfig(enabled=True, kind=kind, source=str(_prompt_file(folder))))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # PEFT starts B at zero, where adapted == base and the KL is exactly 0
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    return module


def _retain_batch(vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (5, 9, 7)]
    answers = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (4, 2, 6)]
    return RetainBatches(prompts, answers, batch_size=3, pad_id=0).batch(0, 0)


def _dense_kl(module, batch) -> torch.Tensor:
    """KL(base || adapted) over every labelled position, from the full logits (adapter on, then off)."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    student = module.model(**kwargs).logits
    with torch.no_grad(), module.model.disable_adapter():
        teacher = module.model(**kwargs).logits
    mask = batch["labels"][:, 1:] != -100
    log_q = F.log_softmax(student[:, :-1][mask], -1)
    log_p = F.log_softmax(teacher[:, :-1][mask], -1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


@pytest.mark.parametrize("loss_impl", ["chunked", "full"])
def test_kl_retain_loss_equals_dense_value_and_gradient(tmp_path, tiny_model_dir, loss_impl):
    module = _module(tiny_model_dir, tmp_path, "kl", loss_impl)
    batch = _retain_batch(module.model.config.vocab_size)
    trained = [p for p in module.model.parameters() if p.requires_grad]
    ours = module.retain_loss(batch)
    dense = _dense_kl(module, batch)
    assert dense > 1e-6  # the adapter moved the model: a zero KL would prove nothing
    torch.testing.assert_close(ours, dense, rtol=1e-5, atol=1e-7)
    for g_ours, g_dense in zip(torch.autograd.grad(ours, trained), torch.autograd.grad(dense, trained), strict=True):
        torch.testing.assert_close(g_ours, g_dense, rtol=1e-4, atol=1e-8)


def test_distill_retain_loss_is_the_models_own_loss_on_the_base_answers(tmp_path, tiny_model_dir):
    module = _module(tiny_model_dir, tmp_path, "distill")
    batch = _retain_batch(module.model.config.vocab_size)
    dense = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
    torch.testing.assert_close(module.retain_loss(batch), dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["kl", "distill"])
def test_retain_gradient_reaches_only_the_trained_lora(tmp_path, tiny_model_dir, kind):
    module = _module(tiny_model_dir, tmp_path, kind)
    module.retain_loss(_retain_batch(module.model.config.vocab_size)).backward()
    with_grad = {n for n, p in module.model.named_parameters() if p.grad is not None}
    nonzero = {n for n, p in module.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {n for n in nonzero if "lora_A" in n} and {n for n in nonzero if "lora_B" in n}
    assert all("lora_" in n and ".default." in n for n in with_grad), sorted(with_grad)[:5]


def test_base_answers_ignore_the_adapter_keep_the_rng_and_are_cached(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module = _module(tiny_model_dir, tmp_path, "kl")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = torch.random.get_rng_state()
    prompt_ids, answers = generate_base_answers(module.model, tokenizer, PROMPTS[:3], 6, 64)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert module.model.training  # restored after generating in eval mode
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for ids, answer in zip(prompt_ids, answers, strict=True):
        out = base.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
        assert out[0, len(ids):len(ids) + len(answer)].tolist() == answer
    cache = tmp_path / "cache.json"
    first = cached_base_answers(cache, module.model, tokenizer, PROMPTS[:3], "m", 6, 64)
    assert first == (prompt_ids, answers) and cache.is_file()
    assert cached_base_answers(cache, None, tokenizer, PROMPTS[:3], "m", 6, 64) == first  # read, no model needed
    with pytest.raises(AttributeError):  # another setting is not served from the cache
        cached_base_answers(cache, None, tokenizer, PROMPTS[:3], "m", 7, 64)


def test_retain_batches_depend_only_on_seed_and_position():
    batches = RetainBatches([[1, 2]] * 5, [[3], [4], [5], [6], [7]], batch_size=2, pad_id=0, seed=3)
    again = RetainBatches([[1, 2]] * 5, [[3], [4], [5], [6], [7]], batch_size=2, pad_id=0, seed=3)
    assert all(torch.equal(batches.batch(4, 1)[k], again.batch(4, 1)[k]) for k in ("input_ids", "labels"))
    draws = {tuple(batches.batch(s, 0)["input_ids"][:, -1].tolist()) for s in range(20)}
    assert len(draws) > 1
    assert batches.batch(0, 0)["labels"][0, :2].tolist() == [-100, -100]


def test_prompts_load_with_exclusions_and_duplicates_dropped(tmp_path):
    source = _prompt_file(tmp_path, [*PROMPTS, "  what is the CAPITAL of france? ", ""])
    excluded = tmp_path / "eval.jsonl"
    excluded.write_text(json.dumps({"turns": ["Who wrote Hamlet?"]}) + "\n")
    prompts, stats = load_retain_prompts(RetainConfig(enabled=True, source=str(source), exclude=[str(excluded)]))
    assert prompts == [p for p in PROMPTS if p != "Who wrote Hamlet?"]
    assert stats["dropped"] == {"empty": 1, "excluded": 1, "duplicate": 1}
    assert load_retain_prompts(RetainConfig(source=str(source), max_prompts=2))[0] == PROMPTS[:2]
    with pytest.raises(RetainSourceError, match="no column 'instruction'"):
        load_retain_prompts(RetainConfig(source=str(source), prompt_field="instruction"))


def test_bad_retain_settings_are_all_reported_at_once(tmp_path):
    cfg = RetainConfig(enabled=True, kind="nope", weight=-1.0, source=str(tmp_path / "none.jsonl"),
                       exclude=[str(tmp_path / "gone.jsonl")], batch_size=0, max_new_tokens=0, max_prompts=0)
    with pytest.raises(ValueError) as err:
        check_retain_config(cfg, merge_adapters=["artifacts/refusal_lora"])
    message = str(err.value)
    assert "8 problem(s)" in message
    for words in ("retain.kind", "retain.weight", "none.jsonl", "gone.jsonl", "retain.batch_size",
                  "retain.max_new_tokens", "retain.max_prompts", "merge_adapters"):
        assert words in message
    check_retain_config(RetainConfig(kind="nope"))  # off: never checked, old configs keep working
    with pytest.raises(ValueError, match="retain.source is not set"):
        check_retain_config(RetainConfig(enabled=True))


@pytest.mark.parametrize("source", [None, "retain_proxy.jsonl"], ids=["demo", "twins-and-facts"])
def test_demo_retain_prompts_share_none_with_any_evaluated_or_validation_set(source):
    from refusal_lightning.train.harmfulqa import heldout_questions

    config = yaml.safe_load((REPO / "configs/cpu/refusal_lora.yaml").read_text())
    retain = RetainConfig(**config["model"]["retain"])
    assert retain.enabled
    # the exclusions off: the file itself must be clean, not only what is left of it after them
    file = Path(retain.source) if source is None else PROXY / source
    prompts = prompt_file_texts(REPO / file)
    data = config["data"]
    heldout = [q["question"] for q in heldout_questions(data["source"], data["val_fraction"], data.get("seed", 0))]
    evaluated = [t for name in ("benign_eval", "sorry_bench_proxy", "benign_contrast_proxy",
                                "validation_sorry_proxy", "validation_benign_proxy")
                 for t in prompt_file_texts(PROXY / f"{name}.jsonl")] + heldout
    assert len(prompts) >= 50 and len(evaluated) > 400
    if source is None:
        kept, _ = load_retain_prompts(retain)
        assert len(kept) == 103 and not {normalise(p) for p in kept} & {normalise(t) for t in evaluated}
    else:
        assert not {normalise(p) for p in prompts} & {normalise(t) for t in evaluated}


def test_twin_retain_prompts_come_from_the_training_split_only():
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from make_retain_prompts import retain_rows

    from refusal_lightning.train.harmfulqa import load_records, split_records

    rows = retain_rows()
    assert rows == [json.loads(line) for line in (PROXY / "retain_proxy.jsonl").open()]  # the file is current
    records = load_records(str(PROXY / "harmfulqa_proxy.json"))
    split = split_records(records, 0.25, 0)
    heldout_objects = {str(r["subtopic"]).split()[0] for r in records if split.group_of[r["id"]] in split.val}
    train_objects = {str(r["subtopic"]).split()[0] for r in records if split.group_of[r["id"]] in split.train}
    twins = [r["prompt"] for r in rows if r["kind"] == "twin"]
    assert len(twins) == 150
    # every twin names a training record's object; none names an object found only in held-out records
    assert all(any(o in t for o in train_objects) for t in twins)
    assert not any(o in t for t in twins for o in heldout_objects - train_objects)


def _retain_fit(tmp_path: Path, model_dir: Path, name: str, retain: dict | None) -> Path:
    source = _prompt_file(tmp_path)
    model = {"lora": {"dropout": 0.1}}  # dropout draws random masks: a retain pass that moved the RNG would show
    if retain is not None:
        model["retain"] = {"source": str(source), "batch_size": 3, "max_new_tokens": 4, **retain}
    config = write_fit_config(tmp_path, model_dir, name, trainer={"max_steps": 6, "val_check_interval": 6},
                              ckpt_every=6, model=model)
    result = run_module("fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / name / "adapter"


def test_weight_zero_fit_is_identical_to_the_fit_without_retain(tmp_path, tiny_model_dir):
    from test_fit import _scalars

    off = _retain_fit(tmp_path, tiny_model_dir, "off", None)
    zero = _retain_fit(tmp_path, tiny_model_dir, "zero", {"enabled": True, "weight": 0.0})
    assert_same_adapter(off, zero)
    # the term was computed (and its gradient is not zero: test_retain_gradient_reaches_only_the_trained_lora)
    assert max(_scalars(tmp_path / "zero" / "tensorboard")["retain/loss"]) > 0
    stats = json.loads((zero / "retain_stats.json").read_text())
    assert stats["prompts"] == len(PROMPTS) and stats["config"]["weight"] == 0.0
    cache = json.loads((zero / "retain_answers.json").read_text())
    assert len(cache["answer_ids"]) == len(PROMPTS) and all(len(a) <= 4 for a in cache["answer_ids"])
    assert not (off / "retain_stats.json").exists()


def test_fit_with_a_bad_retain_section_stops_with_one_error_before_loading(tmp_path, tiny_model_dir):
    config = write_fit_config(tmp_path, tiny_model_dir, model={"retain": {"enabled": True, "weight": -1.0}})
    result = run_module("fit", "--config", str(config))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: retain settings, 2 problem(s)" in result.stderr and "Traceback" not in result.stderr
    assert "retain.weight must be >= 0" in result.stderr and "retain.source is not set" in result.stderr
    help_text = " ".join(run_module("fit", "--help").stdout.split())
    assert "``kl``: KL(base || adapted) of the next-token distribution" in help_text
