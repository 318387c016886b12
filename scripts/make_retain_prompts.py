"""Write the CPU demo's retain prompts, from training-side data only: ``data/proxy/retain_proxy.jsonl``.

    python scripts/make_retain_prompts.py            # after `make setup`; deterministic, rewrites the file

Two kinds of benign prompt, in this order (the tuning script holds out the *last* rows, which are facts):

1. ``twin``: 150 of the benign contrast twins inside the **training split** of ``harmfulqa_proxy.json`` (the blue
   conversations' human turns that name the record's invented object and are answered helpfully, not with a
   refusal opener), evenly spaced in file order. They are requests about the training world's objects with
   a harmless intent, the kind of prompt the refusal fit over-refuses. The held-out questions' records
   (``val_fraction: 0.25``, seed 0: the split every fit and the evaluation use) contribute nothing.
2. ``fact``: the training-side factual rows of ``benign_proxy.jsonl``, the ones outside ``benign_eval.jsonl``.

Every evaluated and validation file stays out (the refusal config's ``retain.exclude`` removes any overlap
again at fit time, and ``tests/train/test_retain.py`` checks the file).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from refusal_lightning.files import atomic_write_text  # noqa: E402
from refusal_lightning.train.harmfulqa import load_records, record_id, split_records, valid_records  # noqa: E402

PROXY = REPO / "refusal_lightning/data/proxy"
OUT = PROXY / "retain_proxy.jsonl"
VAL_FRACTION, SEED = 0.25, 0  # configs/cpu/refusal_lora.yaml's data split
TWINS = 150  # evenly spaced over the training twins: the base answers every retain prompt once at fit start


def refusal_prefixes() -> tuple[str, ...]:
    """How the proxy's blue refusals begin (the generator's openers, up to their first placeholder)."""
    vocabulary = json.loads((REPO / "scripts/proxy_vocabulary.json").read_text())
    return tuple(opener.split("{")[0].strip() for opener in vocabulary["refusal_openers"])


def training_twins(source: Path = PROXY / "harmfulqa_proxy.json") -> list[str]:
    """The benign requests about each training record's own object, in file order, each once."""
    records = valid_records(load_records(str(source)))
    split = split_records(records, VAL_FRACTION, SEED)
    refusals = refusal_prefixes()
    twins: dict[str, None] = {}
    for record in records:
        if split.group_of[record_id(record)] not in split.train:
            continue
        name = str(record["subtopic"]).split()[0]
        for turns in record["blue_conversations"].values():
            for human, reply in zip(turns[::2], turns[1::2], strict=False):
                text = human["value"]
                if name in text and not reply["value"].startswith(refusals):
                    twins.setdefault(text)
    every = list(twins)
    return [every[i * len(every) // TWINS] for i in range(min(TWINS, len(every)))]


def training_facts() -> list[dict]:
    """``benign_proxy.jsonl`` rows outside ``benign_eval.jsonl`` (with their references)."""
    evaluated = {json.loads(line)["prompt"] for line in (PROXY / "benign_eval.jsonl").open()}
    rows = [json.loads(line) for line in (PROXY / "benign_proxy.jsonl").open()]
    return [r for r in rows if r["prompt"] not in evaluated]


def retain_rows() -> list[dict]:
    twins = [{"id": f"twin-{i}", "prompt": p, "kind": "twin"} for i, p in enumerate(training_twins())]
    facts = [{"id": f"fact-{r['id']}", "prompt": r["prompt"], "reference": r["reference"], "kind": "fact"}
             for r in training_facts()]
    return twins + facts


def main() -> None:
    rows = retain_rows()
    atomic_write_text(OUT, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("twin", "fact")}
    print(f"wrote {OUT.relative_to(REPO)}: {len(rows)} prompts ({kinds['twin']} twins, {kinds['fact']} facts)")


if __name__ == "__main__":
    main()
