"""Build `sotu_cloze`, an offline multiple-choice task in lm-eval's format, from the SOTU test addresses.

No standard zero-shot set (ARC, HellaSwag, PIQA, WinoGrande, MMLU) can be downloaded here, so this stands in for
them, in the form of HellaSwag's sentence completion: each item gives three consecutive sentences of an address
as the context and asks which of four sentences comes next. The right one is the address's own next sentence;
the three others are sentences of similar length (within 30% of its words) from other addresses of the same
split. The item order, the distractors and the position of the right answer come from --seed.

    python benchmarks/sotu_cloze.py -o runs/tasks            # writes sotu_cloze.yaml and sotu_cloze.jsonl
    qatcli eval MODEL --tasks runs/tasks/sotu_cloze.yaml

Chance is 25%. The task is easier than HellaSwag where another address's topic or era gives a distractor away,
and harder where the addresses' set phrases could follow any context; it measures how much of the model's
knowledge of this kind of text a quantized model keeps, next to perplexity on the same split.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from qatcli.data.sources import read_texts

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
CONTEXT_SENTENCES = 3
CHOICES = 4
MIN_WORDS, MAX_WORDS = 8, 40
LENGTH_SLACK = 0.3

TASK_YAML = """\
# Built by benchmarks/sotu_cloze.py from {data} (seed {seed}, {items} items): which of four sentences follows
# three sentences of a State of the Union address. Chance: 25%.
task: sotu_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: sotu_cloze.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def sentences(text: str) -> list[str]:
    return [" ".join(s.split()) for s in SENTENCE_END.split(text) if s.strip()]


def usable(sentence: str) -> bool:
    return MIN_WORDS <= len(sentence.split()) <= MAX_WORDS


def build_items(texts: list[str], items: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    docs = [sentences(t) for t in texts]
    pool = [(d, s) for d, doc in enumerate(docs) for s in doc if usable(s)]
    candidates = [(d, i) for d, doc in enumerate(docs) for i in range(CONTEXT_SENTENCES, len(doc)) if usable(doc[i])]
    rng.shuffle(candidates)
    out: list[dict] = []
    for d, i in candidates:
        answer = docs[d][i]
        words = len(answer.split())
        similar = [s for other, s in pool if other != d and abs(len(s.split()) - words) <= LENGTH_SLACK * words]
        if len(similar) < CHOICES - 1:
            continue
        choices = [answer, *rng.sample(similar, CHOICES - 1)]
        rng.shuffle(choices)
        context = " ".join(docs[d][i - CONTEXT_SENTENCES : i])
        out.append({"context": context, "choices": choices, "answer": choices.index(answer), "address": d})
        if len(out) == items:
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, required=True, help="directory for the YAML and JSONL")
    parser.add_argument("--data", default="sotu:test")
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    items = build_items(read_texts(args.data, "eval"), args.items, args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    with open(args.output / "sotu_cloze.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    (args.output / "sotu_cloze.yaml").write_text(TASK_YAML.format(data=args.data, seed=args.seed, items=len(items)))
    print(f"{len(items)} items from {len({i['address'] for i in items})} addresses -> {args.output}")


if __name__ == "__main__":
    main()
