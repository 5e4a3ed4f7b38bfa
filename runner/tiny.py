"""Offline stand-ins for the hub: tiny models of the real architecture and small tasks the project makes.

The tiny model is a random-init ``PhiForCausalLM`` (Phi-2's architecture, shrunk) with a byte-level BPE tokenizer
trained on the tiny tasks' text. It is saved to a directory and loaded back by the runner through the same
``from_pretrained`` + quantization path as ``microsoft/phi-2``.

    python -m runner.tiny [--out .cache/tiny]      # builds data/ and phi/ under --out (idempotent)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / ".cache" / "tiny"
EOS = "<|endoftext|>"
# Tiny-model size: big enough to learn the tiny tasks in a couple of minutes on 2 CPU cores.
# A wider init than Phi-2's 0.02 lets LoRA on the frozen random weights reach sharp predictions in fewer steps
# (measured on xsum_tiny, 300 steps: ROUGE-L 68 with 0.08).
TINY_PHI = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                max_position_embeddings=512, partial_rotary_factor=0.4, initializer_range=0.08)
VOCAB_SIZE = 2048
SPLIT_SIZES = {"train": 2000, "validation": 100, "test": 100}

# ---------------------------------------------------------------- tiny news (the XSum twin)

CITIES = ["Riverton", "Lakeside", "Brookfield", "Ashford", "Milltown", "Northgate", "Eastwood", "Kingsbridge",
          "Harwick", "Stonehaven", "Westmere", "Oakridge", "Fairhaven", "Redcliff", "Pinecrest", "Dunmore"]
NAMES = ["Anna Lewis", "Tom Baker", "Maria Costa", "James Reid", "Sara Khan", "Peter Walsh", "Laura Hill",
         "David Chen", "Emma Ward", "Omar Haddad", "Grace Morgan", "Luke Foster", "Nina Patel", "Ben Carter"]
TEAMS = ["United", "Rovers", "Athletic", "Wanderers", "City", "Albion", "Rangers", "Town", "Harriers", "Celtic"]
COMPANIES = ["Norcom", "Baxley Foods", "Tellis Motors", "Greyline", "Orbis Steel", "Helmont Bank", "Veltra",
             "Castor Airways", "Quanta Mills", "Ridgeway Energy"]
VEHICLES = ["bus", "lorry", "van", "tram", "car", "tractor"]
PLACES = ["shop", "bridge", "school", "wall", "station", "market"]
WEATHER = ["snow", "flooding", "ice", "storms", "fog"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "twenty", "forty"]

FILLER = [
    "Officials said more details would be released later in the week.",
    "Local residents gathered outside to watch as the news spread.",
    "A spokesperson declined to comment further on the matter.",
    "The announcement comes after months of discussion in the area.",
    "Several people shared pictures of the scene on social media.",
    "It is the second time this year that the town has made headlines.",
    "Campaigners said they would continue to follow the situation closely.",
    "The council is expected to meet again next month.",
    "Experts said the figures were in line with what had been expected.",
    "Reporters were kept away from the area for most of the day.",
]

EVENTS = [
    ("{city} police said on {day} that {num} people were hurt when a {vehicle} hit a {place}.",
     "{num} people hurt as {vehicle} hits {place} in {city}."),
    ("{name} has won the vote to become mayor of {city}, election officials said on {day}.",
     "{name} elected mayor of {city}."),
    ("{team} beat {team2} by {num} goals in a league match played in {city} on {day}.",
     "{team} beat {team2} by {num} goals."),
    ("{company} said on {day} that it would cut {num} hundred jobs at its factory in {city}.",
     "{company} to cut {num} hundred jobs in {city}."),
    ("Heavy {weather} forced {num} schools in {city} to close on {day}, the council said.",
     "{weather} closes {num} schools in {city}."),
]


def make_news(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        lead, summary = rng.choice(EVENTS)
        team, team2 = rng.sample(TEAMS, 2)
        slots = dict(city=rng.choice(CITIES), name=rng.choice(NAMES), team=team, team2=team2,
                     company=rng.choice(COMPANIES), vehicle=rng.choice(VEHICLES), place=rng.choice(PLACES),
                     weather=rng.choice(WEATHER), day=rng.choice(DAYS), num=rng.choice(NUMBERS))
        sentences = [lead.format(**slots)] + rng.sample(FILLER, rng.randint(2, 4))
        text = summary.format(**slots)
        rows.append({"document": " ".join(sentences), "summary": text[0].upper() + text[1:]})
    return rows


TASKS = {"xsum_tiny": make_news}


# ---------------------------------------------------------------- building


def write_task_data(out: Path, task: str, seed: int = 0) -> Path:
    folder = out / "data" / task
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{task}-{seed}")
    for split, n in SPLIT_SIZES.items():
        rows = TASKS[task](n, rng)
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                f.write(json.dumps({"id": f"{split}-{i}", **row}, ensure_ascii=False) + "\n")
    return folder


def corpus(out: Path):
    for task in TASKS:
        for path in sorted((out / "data" / task).glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                yield " ".join(str(v) for k, v in json.loads(line).items() if k != "id")
    # The prompt templates' own words, so they tokenize into whole words too.
    yield "Instruction: Summarize the following news article in a concise and abstractive way. Article: Summary:"


def train_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(out), trainer=trainer)
    # Like Phi-2: one special token that is BOS, EOS and UNK, and no pad token (the runner sets one).
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                   model_max_length=TINY_PHI["max_position_embeddings"])


def build_model(model_dir: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    vocab = -(-len(tokenizer) // 64) * 64  # padded like Phi-2's 51200, for friendlier matmul shapes
    config = PhiConfig(vocab_size=vocab, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                       resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **{**TINY_PHI, **overrides})
    model = PhiForCausalLM(config)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def build(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    """Data for every tiny task and the tiny Phi model under ``out``; skipped when already there."""
    out = Path(out)
    marker = out / "BUILT"
    if marker.exists() and not force:
        return out
    for task in TASKS:
        write_task_data(out, task)
    build_model(out / "phi", train_tokenizer(out))
    marker.write_text("tiny data and model built by runner.tiny\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where data/ and phi/ go")
    parser.add_argument("--force", action="store_true", help="rebuild even when already built")
    args = parser.parse_args(argv)
    out = build(args.out, args.force)
    print(f"tiny data and model in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
