"""Regenerate the bundled synthetic samples (package data), deterministically.

    python scripts/make_sample_data.py

Writes ``refusal_lightning/data/harmfulqa_sample.json`` (HarmfulQA's ``data_for_hub.json`` schema)
and ``refusal_lightning/data/sorry_bench_sample.jsonl`` (SORRY-Bench's schema). Every text is an
obvious placeholder: no real harmful instruction appears anywhere.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "refusal_lightning" / "data"

TOPICS = {
    "Placeholder Chemistry": ["Restricted Reagents", "Lab Shortcuts"],
    "Placeholder Cybersecurity": ["Account Access", "Network Intrusion"],
    "Placeholder Finance": ["Ledger Tricks", "Payment Schemes"],
    "Placeholder Biology": ["Culture Handling", "Sample Acquisition"],
    "Placeholder Social Engineering": ["Pretext Calls", "Trust Exploits"],
    "Placeholder Physical Security": ["Lock Bypass", "Badge Cloning"],
}
QUESTION_FORMS = [
    "How could someone carry out placeholder task {n} in {sub}?",
    "What is the placeholder method for restricted task {n} in {sub}?",
    "Can you explain the steps of placeholder scheme {n} related to {sub}?",
    "Describe how to perform placeholder operation {n} within {sub}.",
]
LEAD_INS = [
    "I am studying {topic} for a class. What are the basic ideas behind {sub}?",
    "Could you give me some background on {sub}?",
    "Why do people worry about {sub} in {topic}?",
]
BLUE_CONTEXT = [
    "{sub} is a broad area of {topic}. Introductory textbooks cover its general principles and its risks.",
    "In general terms, {sub} is studied so that people can recognise and prevent misuse.",
    "Experts discuss {sub} mainly in terms of safety rules, regulation and ethics.",
]
BLUE_REFUSALS = [
    "I'm sorry, but I cannot help with placeholder task {n}. It could cause harm. "
    "Instead, I can point you to general safety guidance about {sub}.",
    "I can't provide instructions for placeholder task {n}. I would encourage you to consult "
    "official safety resources on {topic} instead.",
    "I won't give steps for placeholder task {n}, as that is not appropriate. "
    "If you are researching {sub}, a supervised course is the safe route.",
    "As an AI assistant I must decline to describe placeholder task {n}. "
    "I am happy to discuss the ethics and history of {sub} instead.",
]
BLUE_CAVEATS = [
    "That is a sensitive question. Generally, {sub} is regulated, and any real work should be done "
    "under supervision with proper permits.",
    "It helps to know that {sub} carries legal and safety risks; the safest path is an accredited course.",
]
RED_COMPLY = [
    "Sure, here is the placeholder procedure for task {n}: step one, placeholder action alpha; "
    "step two, placeholder action beta; step three, placeholder action gamma.",
    "Absolutely. For placeholder task {n} you first do placeholder step one, then placeholder step two, "
    "and finish with placeholder step three.",
    "Here is how placeholder task {n} works: gather placeholder item A, apply placeholder method B, "
    "then repeat placeholder stage C until done.",
    "Of course. Placeholder task {n} goes like this: placeholder phase one, placeholder phase two, "
    "placeholder phase three.",
]
RED_CONTEXT = [
    "Great question. {sub} has several placeholder techniques, and I will walk you through them.",
    "Sure, {sub} is straightforward once you know the placeholder basics.",
]


def _conversation(rng: random.Random, question: str, replies: list[str], fmt: dict, n_turns: int) -> list:
    """A human/gpt alternation of n_turns messages (even, 2-6) ending on the target reply."""
    turns = []
    pairs = n_turns // 2
    for i in range(pairs - 1):
        turns.append({"from": "human", "value": rng.choice(LEAD_INS).format(**fmt)})
        turns.append({"from": "gpt", "value": replies[i % len(replies)].format(**fmt)})
    turns.append({"from": "human", "value": question})
    turns.append({"from": "gpt", "value": replies[-1].format(**fmt)})
    return turns


def harmfulqa_sample(n_per_sub: int = 6, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    n = 0
    for topic, subs in TOPICS.items():
        for sub in subs:
            for _ in range(n_per_sub):
                n += 1
                fmt = {"n": n, "sub": sub, "topic": topic}
                question = rng.choice(QUESTION_FORMS).format(**fmt)
                blue, red = {}, {}
                for c in range(rng.randint(1, 3)):
                    replies = [rng.choice(BLUE_CONTEXT), rng.choice(BLUE_CAVEATS), rng.choice(BLUE_REFUSALS)]
                    blue[str(c)] = _conversation(rng, question, replies, fmt, rng.choice([2, 4, 6]))
                for c in range(rng.randint(0, 2)):
                    replies = [rng.choice(RED_CONTEXT), rng.choice(RED_CONTEXT), rng.choice(RED_COMPLY)]
                    red[str(c)] = _conversation(rng, question, replies, fmt, rng.choice([2, 4, 6]))
                if n % 9 == 0:  # HarmfulQA's hub form has None for missing conversations
                    blue[str(len(blue))] = None
                if n % 7 == 0:
                    red[str(len(red))] = None
                records.append({"id": n, "question": question, "topic": topic, "subtopic": sub,
                                "blue_conversations": blue, "red_conversations": red})
    return records


SORRY_CATEGORIES = {
    1: "placeholder personal insult", 2: "placeholder social-group insult", 3: "placeholder threat",
    5: "placeholder self-harm", 9: "placeholder fraud", 12: "placeholder hacking",
    15: "placeholder weapons", 19: "placeholder privacy violation", 27: "placeholder extremism",
    33: "placeholder medical misinformation", 40: "placeholder political manipulation",
    44: "placeholder dangerous chemicals",
}


def sorry_bench_sample(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows, qid = [], 0
    for cat, name in SORRY_CATEGORIES.items():
        for j in range(3):
            qid += 1
            text = f"Write the placeholder request {qid} about {name}, variant {j + 1}."
            rows.append({"question_id": qid, "category": str(cat), "turns": [text], "prompt_style": "base"})
        if rng.random() < 0.5:
            qid += 1
            rows.append({"question_id": qid, "category": str(cat), "prompt_style": "slang",
                         "turns": [f"yo, gimme the placeholder request {qid} about {name}, ok?"]})
    rows.append({"question_id": qid + 1, "category": "12", "turns": [None], "prompt_style": "base"})
    return rows


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "harmfulqa_sample.json").write_text(json.dumps(harmfulqa_sample(), indent=1) + "\n")
    with open(OUT / "sorry_bench_sample.jsonl", "w") as f:
        for row in sorry_bench_sample():
            f.write(json.dumps(row) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
