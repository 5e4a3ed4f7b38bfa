"""Property-based fuzzing of the one-line contract, in-process: whatever the recipe, the overrides, the data file
or the `generate --input` file, a command ends normally or with one line `error: <where>: <what>` (exit 2 for the
user's input), never a traceback or another exception, and never an "internal" error.

Cases are mutations of the bundled recipes (wrong types, NaN/inf, huge numbers, unicode, missing and extra keys,
deep or aliased YAML, repeated and non-text keys, broken bytes), overrides built from the schema's key paths, and
hostile rows. Derandomized, so the suite runs the same cases every time; HYPOTHESIS_PROFILE=deep explores new
ones, ten times as many; HYPOTHESIS_PROFILE=quick (what `make test-fast` sets) runs a fifth as many.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.cli import cli, recipes
from runner.common.errors import RecipeError
from runner.recipe import compose, loader, validation
from tests.conftest import ROOT

CASES = {"recipes": 2000, "overrides": 1200, "inputs": 1700, "rows": 150,  # >= 5,000 in all
         "override_sizes": 300, "config_dimensions": 12}
_SCALE = {"deep": 10, "quick": 0.2}.get(os.environ.get("HYPOTHESIS_PROFILE", ""), 1)
_COMMON = dict(deadline=None, database=None, derandomize=_SCALE <= 1, print_blob=True,
               suppress_health_check=list(HealthCheck))


def fuzz_settings(kind: str):
    return settings(max_examples=round(CASES[kind] * _SCALE), **_COMMON)


# ---------------------------------------------------------------- what the cases are made of

BUNDLED = sorted((ROOT / "recipes").rglob("*.yaml"))
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _resolved_base(path: Path) -> dict:
    data = compose._load_with_extends(path, ())  # extends followed, paths absolute: the file can move
    data.pop("extends", None)
    return data


BASES = [_resolved_base(p) for p in BUNDLED]

WORDS = ["auto", "none", "never", "", " ", "-1", "0", "1e400", ".nan", "NaN", "all-linear", "{document}", "{",
         "}", "{{", "{x!r}", "{0}", "{text:>5}", "rouge", "samples", "loss", "classification", "multilabel",
         "os:system", ":X", "X:", "json:JSONDecoder", "evaluators.base:Evaluator", "evaluators.rouge:Rouge",
         "runner.common.errors:RecipeError", "no_such_module_xyz:Cls", "test", "train", "eval", "validation", "bnb_4bit",
         "nf4", "cosine", "adamw_torch", "rank", "\x00", "\u202e", "名前", "🙂", "a" * 300, "\n", "\t", "~", "/",
         "../x.jsonl", "x.csv", "q_proj", "dense", "[", "]", "&a", "*a", "!!python/name:os.system", "%TAG",
         "yes", "on", "null", "~/no", "1_000", "0x10", "0o7", "+.inf", "-.inf", "2.0e-4", "5.0"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.integers(-3, 600),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([5.0, 0.5, 1e-300, 1e300, -0.0]),
    st.sampled_from(WORDS), st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(WORDS), st.text(max_size=6)), inner,
                                                 max_size=4)), max_leaves=10)


def _paths(node, prefix=()):
    """Every key path in a recipe: (section, key, 0, ...)."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


SCHEMA_KEYS = sorted({k for p in _paths(validation.schema()) for k in p if isinstance(k, str)
                      and k not in ("properties", "$defs", "allOf", "then", "if", "items", "anyOf", "oneOf")})


def _plausible(original):
    """A value of the kind the recipe had there: mostly valid, sometimes out of range."""
    if isinstance(original, bool):
        return st.booleans()
    if isinstance(original, int):
        return st.integers(-1, 2 * max(original, 4))
    if isinstance(original, float):
        return st.floats(-1.0, 4.0)
    if isinstance(original, str):
        return st.one_of(st.just(original), st.sampled_from(WORDS))
    if isinstance(original, list):
        return st.lists(st.sampled_from(original or WORDS), max_size=len(original) + 1)
    if isinstance(original, dict):
        return st.just(original)
    return VALUES


def _mutate(data, draw) -> dict:
    """Set, delete or add a few keys anywhere in ``data`` (a deep copy): values of the same kind or hostile ones."""
    data = json.loads(json.dumps(data))
    for _ in range(draw(st.integers(0, 3))):
        paths = _paths(data)
        op = draw(st.sampled_from(["set", "set", "set", "delete", "add"]))
        if not paths or op == "add":
            sections = [(), *(p for p in paths if len(p) < 3 and isinstance(_get(data, p), dict))]
            parent = sections[draw(st.integers(0, len(sections) - 1))]
            key = draw(st.one_of(st.sampled_from(SCHEMA_KEYS), st.text(max_size=8)))
            _get(data, parent)[key] = draw(VALUES)
            continue
        path = paths[draw(st.integers(0, len(paths) - 1))]
        parent, last = _get(data, path[:-1]), path[-1]
        if op == "delete":
            del parent[last]
        else:
            parent[last] = draw(st.one_of(_plausible(parent[last]), VALUES))
    return data


def _get(data, path):
    for part in path:
        data = data[part]
    return data


BOMB = "".join(f"b{i}: &b{i} [" + ", ".join([f"*b{i - 1}" if i else '"x"'] * 9) + "]\n" for i in range(7))
RAW_EDITS = [
    lambda t: t,
    lambda t: t + "seed: 7\nseed: 8\n",
    lambda t: t + "1: x\n",
    lambda t: t + "on: true\n",
    lambda t: BOMB + t + "data: {label_names: {x: *b6}}\n",
    lambda t: t + "prompt: {max_length: " + "[" * 300 + "]" * 300 + "}\n",
    lambda t: t + "training: &t {x: *t}\n",
    lambda t: t + "seed: !!python/object/apply:os.system ['echo pwned']\n",
    lambda t: t + "training: {learning_rate: .nan}\n",
    lambda t: t + "\tbad: tab\n",
    lambda t: t[: len(t) // 2],
    lambda t: "- a list\n- not a mapping\n",
    lambda t: "",
    lambda t: "\xef\xbb\xbf" + t,
]


@st.composite
def recipe_files(draw) -> bytes:
    text = yaml.dump(_mutate(draw(st.sampled_from(BASES)), draw), Dumper=DUMPER, allow_unicode=True, sort_keys=False)
    text = draw(st.sampled_from([RAW_EDITS[0]] * len(RAW_EDITS) + RAW_EDITS))(text)  # half of them as dumped
    data = text.encode("utf-8", errors="surrogatepass")
    if draw(st.sampled_from([False] * 15 + [True])):
        data = data[:10] + b"\xff\xfe\x80" + data[10:]  # not UTF-8
    return data


def _flow(value) -> str:
    return yaml.dump(value, Dumper=DUMPER, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


HOSTILE_VALUE = st.one_of(st.sampled_from(WORDS), st.integers(-2, 600).map(str), st.text(max_size=15),
                          VALUES.map(_flow))
MADE_UP_KEY = st.lists(st.one_of(st.sampled_from(SCHEMA_KEYS), st.text(max_size=5)), min_size=1, max_size=4).flatmap(
    lambda parts: st.tuples(*(st.sampled_from(["", "", "[0]", "[1]", "[99]", "[0][0]"]) for _ in parts)).map(
        lambda ix: ".".join(p + i for p, i in zip(parts, ix, strict=True))))


def _one_override(base: dict):
    values = {loader._fmt(p): _get(base, p) for p in _paths(base)}
    keys = st.sampled_from(sorted(values))
    kind_of = keys.flatmap(lambda k: _plausible(values[k]).map(lambda v: f"{k}={_flow(v)}"))
    return st.one_of(
        kind_of, kind_of,  # a key of this recipe, a value of its kind
        st.tuples(keys, HOSTILE_VALUE).map("=".join),  # a key of this recipe, any value
        st.tuples(MADE_UP_KEY, HOSTILE_VALUE).map("=".join),  # made-up paths and indexes
        st.one_of(keys, MADE_UP_KEY, st.just("=x")),  # no override at all
    )


OVERRIDES = {path: st.lists(_one_override(base), min_size=1, max_size=3) for path, base in zip(BUNDLED, BASES,
                                                                                                 strict=True)}
RECIPE_AND_OVERRIDES = st.sampled_from(BUNDLED).flatmap(lambda p: st.tuples(st.just(p), OVERRIDES[p]))


# ---------------------------------------------------------------- the contract


def run_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def assert_contract(code: int, err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    if code == 0:
        return
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith("error: "), lines[0]
    assert "internal" not in lines[0].split(":")[1], lines[0]
    assert len(lines[0]) < 800, lines[0][:300]


@pytest.fixture(scope="module")
def workdir():
    shm = Path("/dev/shm")  # memory-backed where there is one: thousands of small writes
    with tempfile.TemporaryDirectory(prefix="fuzz-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None) as tmp:
        yield Path(tmp)


@fuzz_settings("recipes")
@given(recipe_files())
def test_any_recipe_file_validates_or_fails_in_one_line(workdir, content):
    path = workdir / "recipe.yaml"
    path.write_bytes(content)
    code, _, err = run_main("validate", str(path))
    assert_contract(code, err)


@fuzz_settings("overrides")
@given(RECIPE_AND_OVERRIDES)
def test_any_override_validates_or_fails_in_one_line(case):
    recipe_path, texts = case
    code, _, err = run_main("validate", str(recipe_path), *texts)
    assert_contract(code, err)


# ---------------------------------------------------------------- sizes a user controls (issue 30)

KEY_PART = st.one_of(st.sampled_from(SCHEMA_KEYS), st.text(alphabet="abc_.[]0123456789=", max_size=8))
LONG_KEY = st.one_of(
    st.integers(1, 5000).map(lambda n: ".".join(["a"] * n)),  # deep dotted paths
    st.integers(150, 300_000).map(lambda n: "training." + "k" * n),  # long names
    st.lists(KEY_PART, min_size=1, max_size=40).map(".".join),
    st.integers(1, 3000).map(lambda n: "lora" + "[0]" * n))
LONG_VALUE = st.one_of(
    st.integers(100, 300_000).map(lambda n: "x" * n),
    st.integers(10, 2000).map(lambda n: "[" * n + "]" * n),
    st.integers(10, 20_000).map(lambda n: "[" + ",".join(["1"] * n) + "]"),
    st.integers(10, 5000).map(lambda n: "{" + ",".join(f"k{i}: .nan" for i in range(n)) + "}"),
    HOSTILE_VALUE)
SIZED_OVERRIDE = st.one_of(
    st.tuples(LONG_KEY, HOSTILE_VALUE).map("=".join),
    st.tuples(st.sampled_from(["training.max_steps", "model.name_or_path", "name", "lora.target_modules",
                               "evaluation.evaluators", "prompt.template", "data.label_names"]),
              LONG_VALUE).map("=".join))


@fuzz_settings("override_sizes")
@given(st.lists(SIZED_OVERRIDE, min_size=1, max_size=3))
def test_override_keys_and_values_of_any_size_fail_in_one_short_line(texts):
    """Keys and values of any length or depth: validated or refused in one line that quotes a head...tail of them."""
    code, _, err = run_main("validate", str(BUNDLED[0]), *texts)
    assert_contract(code, err)


DIMENSION = st.sampled_from([0, -1, 1, 2, 4, 7, 16, 64, 10**7, 2**63, "x", None, 1.5, True, [4]])
CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
               "vocab_size")


@fuzz_settings("config_dimensions")
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), DIMENSION, min_size=1, max_size=4))
def test_any_config_json_dimensions_plan_or_fail_in_one_line(tiny, workdir, dimensions):
    """`runner plan` reads a model's config.json: zero, negative, absurd or mistyped sizes are refused in one line
    (exit 1 or 2), never a division by zero, an internal error or minutes spent building a huge meta model."""
    model = workdir / "model"
    model.mkdir(exist_ok=True)
    config = json.loads((tiny / "phi" / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **dimensions}))
    code, _, err = run_main("plan", str(ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"), f"model.name_or_path={model}",
                            "--gpu-gb", "80")
    lines = [line for line in err.splitlines() if line.strip()]
    if code:
        assert code in (1, 2) and len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
        assert "internal" not in lines[0].split(":")[1], lines[0]


# ---------------------------------------------------------------- data a user hands over

TEXT = st.one_of(st.text(max_size=40), st.sampled_from(WORDS),
                 st.integers(1, 4).map(lambda n: "word " * (300 * n)), st.just("x" * 5000))
FIELD_VALUES = st.one_of(TEXT, st.none(), st.booleans(), st.integers(), st.floats(), st.lists(TEXT, max_size=3),
                         st.dictionaries(st.text(max_size=4), TEXT, max_size=2))


@pytest.fixture(scope="module")
def xsum_recipe_and_tokenizer(tiny):
    from runner.model import model as model_mod

    recipe = recipes.load(ROOT / "recipes" / "tiny" / "xsum_tiny.yaml")
    return recipe, model_mod.load_tokenizer(recipe)


@st.composite
def input_files(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["text", "json", "json", "broken"]))
        if kind == "text":
            lines.append(draw(TEXT).replace("\n", " "))
        elif kind == "json":
            keys = draw(st.lists(st.sampled_from(["document", "summary", "id", "extra", ""]), max_size=3))
            row = {k: draw(FIELD_VALUES) for k in keys}
            lines.append(json.dumps(row, allow_nan=True))
        else:
            lines.append(draw(st.sampled_from(["{", "{\"document\": ", "[1, 2]", "null", "\"just a string\""])))
    data = "\n".join(lines).encode("utf-8", errors="surrogatepass")
    if draw(st.integers(0, 9)) == 0:
        data += b"\n\xc3\x28 broken utf-8"
    return data


@fuzz_settings("inputs")
@given(content=input_files())
def test_any_generate_input_is_read_or_refused_in_one_line(workdir, xsum_recipe_and_tokenizer, content):
    from runner.evaluate import infer

    recipe, tokenizer = xsum_recipe_and_tokenizer
    path = workdir / "inputs.jsonl"
    path.write_bytes(content)
    try:
        rows = infer.read_inputs(infer.open_input(str(path)), recipe)
        for row in rows:
            prompt, _ = infer.fit_prompt(row, recipe, tokenizer)
            assert isinstance(prompt, str)
    except RecipeError as exc:
        assert_contract(exc.exit_code, exc.line())


@st.composite
def data_files(draw) -> bytes:
    rows = []
    for i in range(draw(st.integers(0, 6))):
        keys = draw(st.lists(st.sampled_from(["document", "summary", "id", "extra"]), min_size=1, max_size=4,
                             unique=True))
        rows.append({k: (f"r{i}" if k == "id" else draw(FIELD_VALUES)) for k in keys})
    lines = [json.dumps(r, allow_nan=True) for r in rows]
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["", "{", "[]", "{\"document\": 1,}"])))
    return "\n".join(lines).encode("utf-8", errors="surrogatepass")


@fuzz_settings("rows")
@given(content=data_files(), holdout=st.integers(0, 3))
def test_any_data_file_is_prepared_or_refused_in_one_line(workdir, xsum_recipe_and_tokenizer, content, holdout):
    from runner.data import data as data_mod

    recipe, tokenizer = xsum_recipe_and_tokenizer
    path = workdir / "rows.jsonl"
    path.write_bytes(content)
    raw = json.loads(json.dumps(recipe))
    raw["data"].update(source={"train": str(path)}, holdout={"eval": 0, "test": holdout})
    raw["evaluation"]["split"] = "test" if holdout else "train"
    raw["training"]["eval_every"] = None
    try:
        prepared = data_mod.prepare(recipes.validate(raw), tokenizer)
        for split in prepared.splits.values():
            assert all(n <= recipe["prompt"]["max_length"] for n in split["n_tokens"])
    except RecipeError as exc:
        assert_contract(exc.exit_code, exc.line())
