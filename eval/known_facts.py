"""Which facts of the shipped set SmolLM2-135M knows (greedy top-1), per relation.

``python eval/known_facts.py`` (about a minute on 2 CPU cores). Writes a JSON summary (counts per
relation, the known ids) to ``eval/out/known_facts_<model>.json`` and prints a table. The filter is
computed at run time wherever facts are used; this script only reports it.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import torch

from lens.analysis.known_facts import known_facts
from lens.artifacts.files import write_json
from lens.core.model import load_model
from lens.data.facts import load_facts

OUT = Path(__file__).resolve().parent / "out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", default=None, help="a .jsonl fact file (default: the shipped set)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    facts = load_facts(args.facts)
    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    known = known_facts(model, tokenizer, facts, batch_size=args.batch_size)
    seconds = time.perf_counter() - start

    total = Counter(fact.relation for fact in facts)
    hits = Counter(fact.relation for fact in known)
    summary = {
        "model": args.model,
        "facts_file": str(args.facts or "shipped"),
        "criterion": "greedy next token after text() == first token of target_true",
        "facts": len(facts),
        "known": len(known),
        "seconds": round(seconds, 1),
        "per_relation": {rel: {"facts": total[rel], "known": hits[rel]} for rel in total},
        "known_ids": [fact.id for fact in known],
    }
    path = write_json(summary, OUT / f"known_facts_{Path(args.model).name}.json")

    width = max(len(rel) for rel in total)
    print(f"{'relation':<{width}}  facts  known  share")
    for rel in total:
        print(f"{rel:<{width}}  {total[rel]:5d}  {hits[rel]:5d}  {hits[rel] / total[rel]:5.0%}")
    print(f"{'all':<{width}}  {len(facts):5d}  {len(known):5d}  {len(known) / len(facts):5.0%}")
    print(f"{args.model}: {seconds:.1f} s for the filter; summary in {path}")


if __name__ == "__main__":
    main()
