"""Offline stand-ins for the hub: tiny models of the real architecture and small tasks the project makes.

The tiny model is a random-init ``PhiForCausalLM`` (Phi-2's architecture, shrunk) with a byte-level BPE tokenizer
trained on the tiny tasks' text. It is saved to a directory and loaded back by the runner through the same
``from_pretrained`` + quantization path as ``microsoft/phi-2``.

    python -m runner.model.tiny [--out .cache/tiny]      # builds data/ and phi/ under --out (idempotent)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[2] / ".cache" / "tiny"
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


# ---------------------------------------------------------------- tiny topics (the AG News twin)

TOPICS = {
    "World": [
        "Leaders of {country} and {country2} met in {capital} on {day} to talk about the {issue}.",
        "The president of {country} called for new elections after {num} weeks of protests.",
        "Troops from {country} crossed the border into {country2} early on {day}, officials said.",
        "The United Nations urged {country} to end the {issue} before the winter.",
        "Thousands marched through {capital} on {day} to demand an end to the {issue}.",
    ],
    "Sports": [
        "{team} beat {team2} by {num} goals in the cup final on {day}.",
        "{name} won the {race} race in {city} and set a new season record.",
        "The coach of {team} was sacked after {num} defeats in a row.",
        "{name} scored twice as {team} came back to draw with {team2}.",
        "Fans of {team} celebrated the league title in {city} on {day}.",
    ],
    "Business": [
        "Shares of {company} rose {num} percent after the firm reported higher profits.",
        "{company} agreed to buy {company2} for {num} billion dollars, the companies said.",
        "Oil prices fell on {day} as markets worried about weak demand.",
        "{company} will cut {num} hundred jobs to lower its costs, the chief executive said.",
        "The central bank raised interest rates on {day} to slow rising prices.",
    ],
    "Sci/Tech": [
        "Researchers at {lab} built a {gadget} that runs for {num} days on one charge.",
        "{techco} released a new version of its {software} software on {day}.",
        "Scientists found water ice on a moon of {planet}, the space agency said.",
        "A security flaw in the {software} browser lets hackers read private files.",
        "{techco} unveiled a faster {gadget} chip for phones and laptops.",
    ],
}
COUNTRIES = ["Norland", "Estavia", "Marovia", "Kestria", "Valdora", "Tarsland", "Ostrava", "Belmont"]
CAPITALS = ["Norburg", "Estapol", "Marov", "Kest", "Valport", "Tarsby"]
ISSUES = ["border dispute", "civil war", "refugee crisis", "trade war", "peace talks"]
RACES = ["marathon", "cycling", "ski", "swimming", "sprint"]
LABS = ["Harwick University", "the Stonehaven Institute", "Oakridge College", "the Lakeside Lab"]
GADGETS = ["robot", "sensor", "battery", "drone", "camera"]
TECHCOS = ["Microbyte", "Pixelsoft", "Datacore", "Netwave", "Quantix"]
SOFTWARE = ["Skylark", "Nimbus", "Falcon", "Orion"]
PLANETS = ["Jupiter", "Saturn", "Neptune", "Uranus"]
NEWS_FILLER = ["More details are expected later this week.", "The news was reported by several outlets.",
               "Analysts said the move had been expected.", "A statement was released on the same day."]


def make_topics(n: int, rng: random.Random) -> list[dict]:
    rows = []
    labels = list(TOPICS)
    for i in range(n):
        label = labels[i % len(labels)] if i < len(labels) else rng.choice(labels)
        country, country2 = rng.sample(COUNTRIES, 2)
        team, team2 = rng.sample(TEAMS, 2)
        company, company2 = rng.sample(COMPANIES, 2)
        slots = dict(country=country, country2=country2, capital=rng.choice(CAPITALS), issue=rng.choice(ISSUES),
                     day=rng.choice(DAYS), num=rng.choice(NUMBERS), team=team, team2=team2, name=rng.choice(NAMES),
                     race=rng.choice(RACES), city=rng.choice(CITIES), company=company, company2=company2,
                     lab=rng.choice(LABS), gadget=rng.choice(GADGETS), techco=rng.choice(TECHCOS),
                     software=rng.choice(SOFTWARE), planet=rng.choice(PLANETS))
        sentences = [rng.choice(TOPICS[label]).format(**slots)]
        if rng.random() < 0.5:  # a topic-free sentence, before or after, so position alone gives nothing away
            sentences.insert(rng.randint(0, 1), rng.choice(NEWS_FILLER))
        rows.append({"text": " ".join(sentences), "label": label})
    return rows


# ---------------------------------------------------------------- tiny emotions (the GoEmotions twin)

# A subset of GoEmotions' 28 names, in the dataset's label order (the order a multi-label target lists them in).
EMOTIONS = {
    "admiration": ["your {thing} was truly impressive", "I really admire how you handled the {thing}",
                   "what a great {thing}, well done"],
    "anger": ["I am furious about the {thing}", "this {thing} makes me so angry", "how dare they ruin the {thing}"],
    "fear": ["I am scared of the {thing}", "the {thing} really terrifies me", "I worry that the {thing} will go badly"],
    "gratitude": ["thank you so much for the {thing}", "I am grateful for your help with the {thing}",
                  "thanks for sharing the {thing}"],
    "joy": ["I am so happy about the {thing}", "the {thing} made my day", "I feel great after the {thing}"],
    "sadness": ["I feel so sad about the {thing}", "the {thing} made me cry", "I miss the old {thing} so much"],
    "surprise": ["wow, I did not expect the {thing}", "the {thing} caught me completely off guard",
                 "I am shocked by the {thing}"],
    "neutral": ["the {thing} starts at {hour}", "I read about the {thing} yesterday", "the {thing} is on {day}"],
}
THINGS = ["game", "movie", "concert", "trip", "meeting", "party", "news", "storm", "dinner", "exam", "book", "match"]


def make_emotions(n: int, rng: random.Random) -> list[dict]:
    rows = []
    feelings = [e for e in EMOTIONS if e != "neutral"]
    for _ in range(n):
        if rng.random() < 0.15:
            labels = ["neutral"]
        else:
            labels = rng.sample(feelings, 2 if rng.random() < 0.4 else 1)
        clauses = [rng.choice(EMOTIONS[e]).format(thing=rng.choice(THINGS), hour=f"{rng.randint(1, 12)} pm",
                                                   day=rng.choice(DAYS)) for e in labels]
        text = rng.choice([". ", " and ", ", but "]).join(clauses)
        rows.append({"text": text[0].upper() + text[1:] + rng.choice([".", "!", ""]),
                     "labels": sorted(labels, key=list(EMOTIONS).index)})
    return rows


# ---------------------------------------------------------------- tiny inference pairs (the MNLI twin)

GOODS = ["apples", "books", "tickets", "chairs", "bikes", "lamps"]
VERBS = [("bought", "buy"), ("sold", "sell"), ("painted", "paint"), ("repaired", "repair")]
# Per label, hypotheses from the premise's slots; {city2} and {name2} differ from the premise's, so the
# "was in" hypotheses can only be told apart by comparing them with the premise.
HYPOTHESES = {
    "entailment": ["{name} {past} some {goods}.", "{name} was in {city} on {day}.", "Someone {past} {goods} in {city}."],
    "neutral": ["{name} {past} the {goods} for a friend.", "{name2} was in {city} on {day}.",
                "{name} was happy to be in {city}."],
    "contradiction": ["{name} did not {verb} any {goods}.", "{name} was in {city2} on {day}.",
                      "{name} never went to {city}."],
}


def make_nli(n: int, rng: random.Random) -> list[dict]:
    rows = []
    labels = list(HYPOTHESES)
    for i in range(n):
        label = labels[i % len(labels)] if i < len(labels) else rng.choice(labels)
        name, name2 = rng.sample(NAMES, 2)
        city, city2 = rng.sample(CITIES, 2)
        past, verb = rng.choice(VERBS)
        slots = dict(name=name, name2=name2, city=city, city2=city2, past=past, verb=verb, goods=rng.choice(GOODS),
                     day=rng.choice(DAYS), num=rng.choice(NUMBERS))
        premise = "{name} {past} {num} {goods} in {city} on {day}.".format(**slots)
        rows.append({"premise": premise, "hypothesis": rng.choice(HYPOTHESES[label]).format(**slots), "label": label})
    return rows


# ---------------------------------------------------------------- tiny chats (the chat-format twin)

SYSTEM_TURNS = ["You sort news into World, Sports, Business or Sci/Tech.", "Answer with the topic only."]
FIRST_ASKS = ["Classify the topic of the news article: {text}", "What is the topic of this article? {text}",
              "Topic of the article? {text}"]
NEXT_ASKS = ["And this one? {text}", "Now this article: {text}", "Classify this one too: {text}"]


def make_chat(n: int, rng: random.Random) -> list[dict]:
    """Conversations in TRL's format about the AG News twin's articles: an optional system turn, then one or two
    user turns asking for an article's topic, each answered by the assistant. The last answer is what evaluation
    predicts; with two exchanges it is about the second article, so the model must read the last user turn."""
    rows = []
    for topic in make_topics(n, rng):
        messages = [{"role": "system", "content": rng.choice(SYSTEM_TURNS)}] if rng.random() < 0.5 else []
        messages += [{"role": "user", "content": rng.choice(FIRST_ASKS).format(text=topic["text"])},
                     {"role": "assistant", "content": topic["label"]}]
        if rng.random() < 0.5:
            other = make_topics(5, rng)[-1]  # make_topics gives its first four rows one topic each; the fifth is random
            messages += [{"role": "user", "content": rng.choice(NEXT_ASKS).format(text=other["text"])},
                         {"role": "assistant", "content": other["label"]}]
        rows.append({"messages": messages})
    return rows


def make_topic_pairs(n: int, rng: random.Random) -> list[dict]:
    """Preference pairs about the AG News twin's articles: the true topic chosen, another topic rejected (the
    DPO/ORPO/KTO twin); ``label`` stays, so evaluation scores the topic as the AG News twin does."""
    rows = []
    for row in make_topics(n, rng):
        rows.append({**row, "rejected": rng.choice([t for t in TOPICS if t != row["label"]])})
    return rows


TASKS = {"xsum_tiny": make_news, "agnews_tiny": make_topics, "goemotions_tiny": make_emotions,
         "mnli_tiny": make_nli}
# Tasks made from the study tasks' words: written beside them, but left out of the tokenizer's training text, so
# adding one changes neither the tokenizer nor the tiny model (nor any other twin's numbers).
DERIVED_TASKS = {"chat_tiny": make_chat, "agnews_pref_tiny": make_topic_pairs}


# ---------------------------------------------------------------- building


def write_task_data(out: Path, task: str, seed: int = 0) -> Path:
    folder = out / "data" / task
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{task}-{seed}")
    for split, n in SPLIT_SIZES.items():
        rows = {**TASKS, **DERIVED_TASKS}[task](n, rng)
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                f.write(json.dumps({"id": f"{split}-{i}", **row}, ensure_ascii=False) + "\n")
    return folder


def corpus(out: Path):
    for task in TASKS:
        for path in sorted((out / "data" / task).glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                yield " ".join(", ".join(v) if isinstance(v, list) else str(v) for k, v in row.items() if k != "id")
    # The prompt templates' own words, so they tokenize into whole words too.
    yield from PROMPT_WORDS


PROMPT_WORDS = (
    "Instruction: Summarize the following news article in a concise and abstractive way. Article: Summary:",
    "Instruction: Classify the topic of the news article as World, Sports, Business or Sci/Tech. Article: Topic:",
    "Instruction: Which emotions does the comment express? Answer with one or more of: admiration, amusement, "
    "anger, annoyance, approval, caring, confusion, curiosity, desire, disappointment, disapproval, disgust, "
    "embarrassment, excitement, fear, gratitude, grief, joy, love, nervousness, optimism, pride, realization, relief, "
    "remorse, sadness, surprise, neutral. Comment: Emotions:",
    "Instruction: Does the premise entail the hypothesis, contradict it, or neither? Answer with entailment, "
    "neutral or contradiction. Premise: Hypothesis: Answer:",
)


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
    """Data for every tiny task and the tiny Phi model under ``out``; skipped when built by this same code."""
    out = Path(out)
    marker = out / "BUILT"
    # The marker names the source that built it: a changed generator (or a new task) rebuilds everything,
    # since the tokenizer is trained on all tasks' text.
    stamp = f"tiny data and model built by runner.model.tiny {hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]}\n"
    if marker.exists() and marker.read_text() == stamp and not force:
        return out
    for task in [*TASKS, *DERIVED_TASKS]:
        write_task_data(out, task)
    build_model(out / "phi", train_tokenizer(out))
    marker.write_text(stamp)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.model.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where data/ and phi/ go")
    parser.add_argument("--force", action="store_true", help="rebuild even when already built")
    args = parser.parse_args(argv)
    out = build(args.out, args.force)
    print(f"tiny data and model in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
