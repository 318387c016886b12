"""The synthetic proxy dataset (``make demo``): deterministic, bundled as generated, in the schemas the code
reads, with every evaluation prompt held out of training and nothing of real harm in it."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest
from conftest import REPO

from refusal_lightning.train.harmfulqa import extract_pairs, load_records
from refusal_lightning.train.refusal_markers import DEFAULT_REFUSAL_MARKERS, is_refusal, refusal_score

BUNDLED = REPO / "refusal_lightning" / "data" / "proxy"
FILES = ("harmfulqa_proxy.json", "sorry_bench_proxy.jsonl", "benign_proxy.jsonl", "benign_contrast_proxy.jsonl",
         "benign_eval.jsonl", "validation_sorry_proxy.jsonl", "validation_benign_proxy.jsonl",
         "report.json")
# Markers of real harm: none may appear in the fictional data (whole words, with simple inflections).
DENY = ("bomb", "explosive", "meth", "ransomware", "nerve agent", "bioweapon", "suicide", "firearm", "gun",
        "heroin", "cocaine", "fentanyl", "malware", "keylogger", "anthrax", "sarin", "ricin", "detonate",
        "poison", "overdose", "self-harm", "kill", "murder", "weapon", "grenade", "napalm", "phishing",
        "password", "drug", "virus")
DENY_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in DENY) + r")(s|es|ed|ing|d)?\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("make_proxy_data", REPO / "scripts" / "make_proxy_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (BUNDLED / name).read_text().splitlines() if line.strip()]


def _records() -> list[dict]:
    return load_records(str(BUNDLED / "harmfulqa_proxy.json"))


def test_generator_is_deterministic(gen, tmp_path):
    gen.write(tmp_path / "a", seed=0)
    gen.main(["--out_dir", str(tmp_path / "b"), "--seed", "0"])
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert gen.generate(1)["harmfulqa_proxy.json"] != gen.generate(0)["harmfulqa_proxy.json"]


def test_bundled_files_equal_a_fresh_generation(gen):
    fresh = gen.generate(0)
    assert sorted(fresh) == sorted(FILES)
    for name, text in fresh.items():
        assert (BUNDLED / name).read_text(encoding="utf-8") == text, (
            f"{name} drifted from scripts/make_proxy_data.py: rerun "
            "`python scripts/make_proxy_data.py --out_dir refusal_lightning/data/proxy`")


def test_records_select_refusals_in_blue_and_compliance_in_red():
    records = _records()
    blue, blue_stats = extract_pairs(records, "blue")
    red, red_stats = extract_pairs(records, "red")
    for stats in (blue_stats, red_stats):
        assert stats.records_read == stats.records_used == len(records) >= 300
        assert not stats.skipped_records and not stats.skipped_conversations
    assert len(blue) == sum(len(r["blue_conversations"]) for r in records)
    assert all(is_refusal(p.reply, DEFAULT_REFUSAL_MARKERS) for p in blue)
    assert all(refusal_score(p.reply, DEFAULT_REFUSAL_MARKERS) == 0 for p in red)
    # the red pick is the compliance, not one of the helpful replies both threads share
    blue_replies = {t["value"] for r in records for c in r["blue_conversations"].values() for t in c}
    assert not any(p.reply in blue_replies for p in red)
    # each conversation: exactly one refusal (blue) and helpful answers to every other turn, in both threads
    all_blue, _ = extract_pairs(records, "blue", selection="all", prompt="turn")
    all_red, _ = extract_pairs(records, "red", selection="all", prompt="turn")
    assert sum(is_refusal(p.reply, DEFAULT_REFUSAL_MARKERS) for p in all_blue) == len(blue) < len(all_blue) // 2
    assert not any(is_refusal(p.reply, DEFAULT_REFUSAL_MARKERS) for p in all_red)


def test_red_and_helpful_replies_carry_no_judge_marker():
    keyword = pytest.importorskip("refusal_lightning.evaluation.keyword_markers")
    records = _records()
    blue, _ = extract_pairs(records, "blue")
    refusals = {p.reply for p in blue}
    others = {t["value"] for r in records for thread in ("blue", "red")
              for c in r[f"{thread}_conversations"].values() for t in c
              if t["from"] == "gpt" and t["value"] not in refusals}
    hits = [text for text in others if refusal_score(text, keyword.JUDGE_REFUSAL_MARKERS)]
    assert not hits, hits[:3]


def test_non_refusal_blue_replies_are_the_helpful_answers_to_the_benign_turns():
    """What the drift null's benign LoRA trains on (``--data.thread=blue --data.selection=non_refusal``)."""
    keyword = pytest.importorskip("refusal_lightning.evaluation.keyword_markers")
    records = _records()
    benign, stats = extract_pairs(records, "blue", "non_refusal", "turn")
    every, _ = extract_pairs(records, "blue", "all", "turn")
    refusals, _ = extract_pairs(records, "blue")
    assert len(benign) == len(every) - len(refusals) and not stats.skipped_conversations
    assert not any(refusal_score(p.reply, keyword.JUDGE_REFUSAL_MARKERS) for p in benign)  # no judge marker either
    harmful = {p.messages[0]["content"] for p in extract_pairs(records, "blue", "most_indicative", "turn")[0]}
    assert not any(p.messages[0]["content"] in harmful for p in benign)  # each answers a benign turn


def test_eval_files_schema_and_held_out(gen):
    report = json.loads((BUNDLED / "report.json").read_text())
    sorry, benign, contrast = (_jsonl(n) for n in FILES[1:4])
    assert len(sorry) == report["counts"]["sorry_bench_proxy"] >= 80
    assert len(benign) == report["counts"]["benign_proxy"] >= 80
    assert len(contrast) == len(sorry)
    assert len({r["question_id"] for r in sorry}) == len(sorry)
    for row in sorry:
        assert set(row) == {"question_id", "category", "turns", "prompt_style"}
        assert isinstance(row["question_id"], int) and row["category"] in report["categories"]
        assert len(row["turns"]) == 1 and row["prompt_style"] == "base"
    for row in benign:
        assert isinstance(row["id"], int) and row["prompt"].strip() and row["reference"].strip()
        assert row["reference"].lower() not in row["prompt"].lower()
    sorry_ids = {r["question_id"] for r in sorry}
    assert all(r["twin_of"] in sorry_ids and "reference" not in r for r in contrast)

    # every string of the training file, and every evaluation prompt: none inside the other
    def strings(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict | list):
            for child in node.values() if isinstance(node, dict) else node:
                yield from strings(child)

    training = "\n".join(strings(_records()))
    eval_prompts = [r["turns"][0] for r in sorry] + [r["prompt"] for r in benign + contrast]
    assert not [p for p in eval_prompts if p in training]
    # held out by construction: no evaluation object name, place or template opening in training
    assert not [w for w in gen.EVAL_NAMES + gen.EVAL_PLACES if re.search(rf"\b{w}\b", training)]
    assert not [t for t in gen.EVAL_TEMPLATES if t.split("{a}")[0] in training]
    assert not {q for q, _ in gen.TRAIN_FACTS + gen.TRAIN_HOWTO} & {r["prompt"] for r in benign}


def test_loaders_read_the_eval_files():
    from refusal_lightning.evaluation import prompts

    sorry = prompts.load_prompts(str(BUNDLED / "sorry_bench_proxy.jsonl"))
    assert len(sorry.prompts) == len(_jsonl("sorry_bench_proxy.jsonl")) and not sorry.skipped
    if hasattr(prompts, "load_benign_prompts"):  # the benign reader (with ``reference``) may be newer than this test
        for name in ("benign_proxy.jsonl", "benign_contrast_proxy.jsonl"):
            assert len(prompts.load_benign_prompts(str(BUNDLED / name))) == len(_jsonl(name))


def test_benign_views_of_the_eval_file_are_its_kinds():
    from refusal_lightning.evaluation.prompts import benign_view, load_benign_prompts

    kinds = {f"benign-{r['id']}": r["kind"] for r in _jsonl("benign_eval.jsonl")}
    views = {p.question_id: benign_view(p) for p in load_benign_prompts(str(BUNDLED / "benign_eval.jsonl"))}
    expected = {"contrast_twin": "benign_contrast", "factual": "benign_facts"}
    assert views == {qid: expected[kind] for qid, kind in kinds.items()}
    assert list(views.values()).count("benign_contrast") == 50


def test_no_marker_of_real_harm():
    for name in FILES[:4]:
        hits = sorted({m.group(0).lower() for m in DENY_RE.finditer((BUNDLED / name).read_text())})
        assert not hits, f"{name}: {hits}"


def test_report_holds_the_bag_of_words_control():
    report = json.loads((BUNDLED / "report.json").read_text())
    control = report["bow_control"]
    for variant in ("all_words", "intent_words_removed"):
        for key in ("heldout_accuracy", "heldout_harmful_vs_benign_contrast", "train_accuracy"):
            assert 0.0 <= control[variant][key] <= 1.0
    assert 0.5 <= control["chance"]["heldout_accuracy"] < 1.0
    assert set(report["categories"]) == {r["category"] for r in _jsonl("sorry_bench_proxy.jsonl")}


def test_every_conversation_answers_its_own_contrast_twin(gen):
    # The refusal fit must see the benign intent on the very object it refuses for, answered helpfully:
    # without that a LoRA learns "refuse requests about these objects" (the demo's over-refusal).
    twins = {gen._fmt(a.twin_answer, o, o.short) for a in gen.ACTIONS
             for o in gen.make_objects(gen.TRAIN_NAMES, gen.TRAIN_PLACES, gen.random.Random("0:train_objects"))}
    helpful = refusals = 0
    for record in _records():
        for conv in record["blue_conversations"].values():
            replies = [t["value"] for t in conv if t["from"] == "gpt"]
            assert sum(r in twins for r in replies) >= 1, record["id"]
            refusals += sum(is_refusal(r) for r in replies)
            helpful += sum(r in twins for r in replies)
    assert helpful >= 1.4 * refusals  # more helpful twin answers than refusals in the blue thread


def test_training_mix_does_not_move_the_evaluation_prompts(gen, monkeypatch):
    before = gen.generate(0)
    monkeypatch.setattr(gen, "EXTRA_TWIN_P", 0.0)
    after = gen.generate(0)
    assert after["harmfulqa_proxy.json"] != before["harmfulqa_proxy.json"]
    for name in ("sorry_bench_proxy.jsonl", "benign_proxy.jsonl", "benign_contrast_proxy.jsonl", "benign_eval.jsonl"):
        assert after[name] == before[name], name


def test_validation_split_is_a_third_world(gen):
    # Baseline hyperparameters are swept on it (scripts/sweep_baselines.py): it must share no object, place
    # or prompt with training or with the evaluated prompts.
    val = [r["turns"][0] for r in _jsonl("validation_sorry_proxy.jsonl")]
    twins = [r["prompt"] for r in _jsonl("validation_benign_proxy.jsonl")]
    assert len(val) == len(twins) >= 30
    evaluated = ([r["turns"][0] for r in _jsonl("sorry_bench_proxy.jsonl")]
                 + [r["prompt"] for r in _jsonl("benign_eval.jsonl")])
    text = "\n".join(evaluated) + json.dumps(_records())
    assert not [w for w in gen.VALIDATION_NAMES + gen.VALIDATION_PLACES if re.search(rf"\b{w}\b", text)]
    assert all(any(re.search(rf"\b{w}\b", p) for w in gen.VALIDATION_NAMES) for p in val + twins)


def test_the_defenders_prompts_are_disjoint_from_the_attackers_and_from_every_evaluated_file():
    from refusal_lightning.train.harmfulqa import (
        defender_attacker_ids,
        heldout_questions,
        normalise_question,
        record_id,
        split_records,
        valid_records,
    )

    records = valid_records(load_records(str(BUNDLED / "harmfulqa_proxy.json")))
    defender, attacker = defender_attacker_ids(records, val_fraction=0.25, seed=0)
    split = split_records(records, 0.25, 0)
    assert defender and attacker and not defender & attacker
    assert defender | attacker == split.record_ids("train")
    assert abs(len(defender) - len(attacker)) <= max(1, split.duplicates + 1)
    assert defender_attacker_ids(records, 0.25, 0) == (defender, attacker)  # deterministic
    # no defender question is asked by an evaluated or a validation file
    asked = {normalise_question(q["question"]) for q in heldout_questions(str(BUNDLED / "harmfulqa_proxy.json"),
                                                                           0.25, 0)}
    for name in ("sorry_bench_proxy.jsonl", "benign_eval.jsonl", "validation_sorry_proxy.jsonl",
                 "validation_benign_proxy.jsonl"):
        for line in (BUNDLED / name).read_text().splitlines():
            row = json.loads(line)
            asked.add(normalise_question(row.get("prompt") or row.get("turns", [""])[0]))
    questions = {normalise_question(r["question"]) for r in records if record_id(r) in defender}
    assert not questions & asked
    # the harmless side (the retain prompts) is training-side too
    harmless = {normalise_question(json.loads(line)["prompt"])
                for line in (BUNDLED / "retain_proxy.jsonl").read_text().splitlines()}
    assert not harmless & asked
