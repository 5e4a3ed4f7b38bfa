"""The tiny demonstration of forgetting (tests/test_retention.py): a base that knows something, and a fine-tune that
makes it forget part of it.

The tiny random-init Phi (.cache/tiny/phi) knows nothing. Here it is pre-trained, all weights, for a few hundred
steps on two sets of made-up facts (which team plays in each town, where each company is based), asked as
multiple-choice questions; that model is the base of a LoRA fine-tune whose training data states other teams for
half the towns. The teams benchmark should then drop (forgetting resolved), the companies benchmark move within noise.

    python -m tests.forgetting OUT     # OUT/base (the pre-trained model), OUT/data/*.jsonl, OUT/forget.yaml
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from runner.model import tiny

ROOT = Path(__file__).resolve().parent.parent
TOWNS = tiny.CITIES  # 16
TEAMS = tiny.TEAMS  # 10
COMPANIES = tiny.COMPANIES  # 10
TEAM_ASKS = ("Which team plays in {x}?", "{x} is home to which team?", "Name the team of {x}.")
COMPANY_ASKS = ("Where is {x} based?", "{x} has its offices in which town?", "Name the town of {x}.")
TEMPLATE = "Question: {question}\nAnswer:"
PRETRAIN_STEPS = 300


def facts(rng: random.Random) -> tuple[dict[str, str], dict[str, str]]:
    teams = {town: rng.choice(TEAMS) for town in TOWNS}
    towns = {company: rng.choice(TOWNS) for company in COMPANIES}
    return teams, towns


def items(known: dict[str, str], asks: tuple[str, ...], pool: list[str], subject: str, rng: random.Random) -> list[dict]:
    """A multiple-choice item per fact and wording: the gold answer and three others from ``pool``."""
    out = []
    for x, gold in known.items():
        for ask in asks:
            choices = [gold, *rng.sample([p for p in pool if p != gold], 3)]
            rng.shuffle(choices)
            out.append({"question": ask.format(x=x), "choices": choices, "answer": choices.index(gold),
                        "subject": subject})
    return out


def pretrain(base_dir: Path, texts: list[str], steps: int = PRETRAIN_STEPS, seed: int = 0) -> Path:
    """The tiny Phi trained, all weights, on ``texts`` (full sequences), saved with its tokenizer to ``base_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    # One thread: the model is too small to split, and on a busy machine threads spin-wait on each other (measured:
    # 0.11 CPU-s a step on one thread, many times that on two while the suite runs).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    source = tiny.build() / "phi"
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    encoded = [tokenizer(t + tiny.EOS)["input_ids"] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = rng.sample(encoded, 16)
        width = max(map(len, batch))
        ids = torch.tensor([row + [tokenizer.eos_token_id] * (width - len(row)) for row in batch])
        labels = torch.tensor([row + [-100] * (width - len(row)) for row in batch])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.set_num_threads(threads)
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return base_dir


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build(out: Path) -> Path:
    """The base, the benchmarks and the forgetting fine-tune's recipe under ``out``; returns the recipe."""
    rng = random.Random(7)
    teams, towns = facts(rng)
    team_items = items(teams, TEAM_ASKS, TEAMS, "teams", rng)
    company_items = items(towns, COMPANY_ASKS, TOWNS, "companies", rng)
    _jsonl(out / "data" / "teams.jsonl", team_items)
    _jsonl(out / "data" / "companies.jsonl", company_items)
    known = [TEMPLATE.format(question=it["question"]) + " " + it["choices"][it["answer"]]
             for it in team_items + company_items]
    pretrain(out / "base", known)
    # The fine-tune: other teams for half the towns, each wording (what the base knew of them is overwritten).
    changed = {town: rng.choice([t for t in TEAMS if t != teams[town]]) for town in TOWNS[::2]}
    rows = [{"question": ask.format(x=town), "answer": team} for town, team in changed.items() for ask in TEAM_ASKS]
    _jsonl(out / "data" / "train.jsonl", rows * 4)
    _jsonl(out / "data" / "eval.jsonl", rows[:8])
    _jsonl(out / "data" / "test.jsonl", rows[:4])
    recipe = out / "forget.yaml"
    recipe.write_text(RECIPE.format(root=ROOT, out=out), encoding="utf-8")
    return recipe


RECIPE = """\
extends: {root}/recipes/tiny/agnews_tiny.yaml
name: forget_tiny
output_dir: {out}/runs
model:
  name_or_path: {out}/base
data:
  source:
    train: {out}/data/train.jsonl
    eval: {out}/data/eval.jsonl
    test: {out}/data/test.jsonl
  eval_samples: 8
  test_samples: 4
  max_tokens: 48
prompt:
  template: "Question: {{question}}\\nAnswer:"
  completion: " {{answer}}"
  max_length: 48
  truncate: null
training:
  max_steps: 40
  eval_every: 20
  task_metrics: 8
  early_stopping: {{patience: 5, metric: classification.accuracy}}
  logging_steps: 10
generation:
  max_new_tokens: 4
evaluation:
  evaluators:
    - name: classification
      labels: null
      confusion_matrix: false
    - name: samples
      count: 4
  retention:
    - name: Teams
      source: {out}/data/teams.jsonl
      subject: subject
    - name: Companies
      source: {out}/data/companies.jsonl
"""


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
