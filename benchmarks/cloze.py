"""Build offline multiple-choice tasks in lm-eval's format: which continuation follows a context, in two domains.

No standard zero-shot set (ARC, HellaSwag, PIQA, WinoGrande, MMLU) can be downloaded here, so these stand in for
them, in the form of HellaSwag's completion:

- `sotu_cloze` (--domain sotu): three consecutive sentences of a State of the Union address, and four sentences
  to follow them: the address's own next sentence, and three of similar length (within 30% of its words) from
  other addresses of the same split.
- `code_cloze` (--domain code): six consecutive non-blank lines of a Python standard-library module (the `code`
  alias's test split), and four lines to follow them: the module's own next non-blank line, and three of
  similar length from the other modules of the split, each with its own indentation.

The item order, the distractors and the position of the right answer come from --seed.

    python benchmarks/cloze.py -o runs/tasks                      # writes sotu_cloze.{yaml,jsonl}
    python benchmarks/cloze.py -o runs/tasks --domain code         # writes code_cloze.{yaml,jsonl}
    qatcli eval MODEL --tasks runs/tasks/sotu_cloze.yaml,runs/tasks/code_cloze.yaml

Chance is 25%. Each measures how much of the model's knowledge of one kind of text a quantized model keeps, next
to perplexity on the same split; two domains keep a model trained on one of them from being judged there alone.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from qatcli.data.sources import read_texts

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
CHOICES = 4
LENGTH_SLACK = 0.3


@dataclass(frozen=True)
class Domain:
    task: str
    data: str
    context: int  # units of context before the one to pick
    min_words: int
    max_words: int
    delimiter: str  # between the context and a choice, and between context units
    what: str


SOTU_WHAT = "four sentences follows three sentences of a State of the Union address"
CODE_WHAT = "four lines follows six non-blank lines of a Python standard-library module"
DOMAINS = {
    "sotu": Domain("sotu_cloze", "sotu:test", 3, 8, 40, " ", SOTU_WHAT),
    "code": Domain("code_cloze", "code:test", 6, 3, 16, "\n", CODE_WHAT),
}

TASK_YAML = """\
# Built by benchmarks/cloze.py from {data} (seed {seed}, {items} items): which of {what}. Chance: 25%.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {task}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: {delimiter}
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


def units(text: str, domain: Domain) -> list[str]:
    """Sentences with their whitespace collapsed, or non-blank lines with their indentation kept."""
    if domain.delimiter == " ":
        return [" ".join(s.split()) for s in SENTENCE_END.split(text) if s.strip()]
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def usable(unit: str, domain: Domain) -> bool:
    return domain.min_words <= len(unit.split()) <= domain.max_words


def build_items(texts: list[str], items: int, seed: int, domain: Domain) -> list[dict]:
    rng = random.Random(seed)
    docs = [units(t, domain) for t in texts]
    pool = [(d, u) for d, doc in enumerate(docs) for u in doc if usable(u, domain)]
    candidates = [
        (d, i) for d, doc in enumerate(docs) for i in range(domain.context, len(doc)) if usable(doc[i], domain)
    ]
    rng.shuffle(candidates)
    out: list[dict] = []
    for d, i in candidates:
        answer = docs[d][i]
        words = len(answer.split())
        similar = [u for other, u in pool if other != d and abs(len(u.split()) - words) <= LENGTH_SLACK * words]
        distinct = [u for u in dict.fromkeys(similar) if u != answer]  # code repeats lines ("else:")
        if len(distinct) < CHOICES - 1:
            continue
        choices = [answer, *rng.sample(distinct, CHOICES - 1)]
        rng.shuffle(choices)
        context = domain.delimiter.join(docs[d][i - domain.context : i])
        out.append({"context": context, "choices": choices, "answer": choices.index(answer), "document": d})
        if len(out) == items:
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, required=True, help="directory for the YAML and JSONL")
    parser.add_argument("--domain", choices=sorted(DOMAINS), default="sotu")
    parser.add_argument("--data", help="the text to draw items from (default: the domain's test split)")
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    domain = DOMAINS[args.domain]
    data = args.data or domain.data
    items = build_items(read_texts(data, "eval"), args.items, args.seed, domain)
    args.output.mkdir(parents=True, exist_ok=True)
    with open(args.output / f"{domain.task}.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    delimiter = json.dumps(domain.delimiter)
    text = TASK_YAML.format(
        data=data, seed=args.seed, items=len(items), what=domain.what, task=domain.task, delimiter=delimiter
    )
    (args.output / f"{domain.task}.yaml").write_text(text)
    print(f"{len(items)} items from {len({i['document'] for i in items})} documents -> {args.output}")


if __name__ == "__main__":
    main()
