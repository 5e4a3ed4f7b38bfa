"""Tokenize once: the prepared data (data.prepare's rendered, fitted, token-counted examples per role) kept in
``.cache/prepared/`` and loaded memory-mapped by later runs, sweep cells and evaluations of the same data.

The key is everything that decides the prepared rows, declared here (``RECIPE_KEYS``, the recipe keys the
preparation reads): the data and prompt sections, the seed, the method and the stop strings; the source's content
(each local file's bytes, hashed; a hub dataset's id, subset, splits and revision); the tokenizer (its whole
serialized form, chat template and special tokens); the roles asked for; and the source of the code that prepares
(runner/data's modules), so a changed preparation is another entry. A key the preparation does not read
(``training.learning_rate``, ``lora.r``) finds the same entry.

An entry is written to a temporary folder and renamed into place: a reader sees a whole entry or none, and of two
processes preparing the same key at once (ranks, sweep cells) the second keeps the first's. An entry that does not
load is prepared again, with a line saying so. A role asked for alone (``runner eval``'s test split) is taken from
an entry of the same data that holds it (the training run's train+eval+test). TRL's own tokenization of a loaded entry is cached by ``datasets``
next to it (a dataset loaded from disk keeps its map results), so a second run skips that too.

``data.cache: false`` (or ``--no-cache``) prepares without reading or writing the cache. ``RUNNER_CACHE_GB``
(default 20) caps the folder: the entries used longest ago are removed first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from runner.common import safeio
from runner.common.errors import RecipeError
from runner.recipe.compose import is_local_path

CACHE_DIR = Path(".cache") / "prepared"
CAP_ENV = "RUNNER_CACHE_GB"
DEFAULT_CAP_GB = 20.0
# The recipe keys the preparation reads (runner/data: data, chat, mixture, preference; runner.recipe.methods).
RECIPE_KEYS = (("data",), ("prompt",), ("seed",), ("training", "method"), ("generation", "stop"),
               ("evaluation", "split"))
CODE = ("data.py", "chat.py", "mixture.py", "preference.py", "files.py")
META = "prepared.json"


def enabled(recipe: dict) -> bool:
    return bool(recipe["data"].get("cache", True))


def _get(recipe: dict, path: tuple[str, ...]):
    value = recipe
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _sources(data: dict) -> list:
    """What the data is, by content: each local file's bytes hashed, a hub dataset by its id and settings."""
    sources = [s["source"] for s in data["sources"]] if data.get("sources") is not None else [data["source"]]
    out = []
    for source in sources:
        values = list(source.values()) if isinstance(source, dict) else [source]
        for value in values:
            if isinstance(value, str) and is_local_path(value) and Path(value).expanduser().is_file():
                out.append(["file", safeio.sha256(Path(value).expanduser())])
            else:  # a hub id: its subset, splits and revision are in the data section, which is in the key
                out.append(["hub", value])
    return out


def tokenizer_identity(tokenizer) -> str:
    """The tokenizer as it tokenizes: its serialized form (vocabulary, merges, added tokens, pre/post processors),
    chat template and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, getattr(tokenizer, "chat_template", None),
                        {k: str(v) for k, v in tokenizer.special_tokens_map.items()}], sort_keys=True)
    return hashlib.sha256((text + extra).encode()).hexdigest()[:16]


def key(recipe: dict, tokenizer, roles: tuple[str, ...], how: str) -> str:
    """The entry's name: a hash of everything that decides the prepared rows (the module docstring lists it),
    then the roles it holds (``<hash>-train+eval+test``)."""
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / name).read_bytes() for name in CODE)).hexdigest()[:16]
    parts = {"recipe": {".".join(p): _get(recipe, p) for p in RECIPE_KEYS}, "sources": _sources(recipe["data"]),
             "tokenizer": tokenizer_identity(tokenizer), "how": how, "code": code}
    parts["recipe"]["data"] = {k: v for k, v in recipe["data"].items() if k != "cache"}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24] + "-" + \
        "+".join(roles)


def _find(folder: Path, name: str, roles: tuple[str, ...]) -> Path | None:
    """The entry of exactly these roles, else one of the same data holding them all (a run's train+eval+test entry
    serves its later evaluation of test)."""
    if (folder / name).is_dir():
        return folder / name
    stem = name.rsplit("-", 1)[0]
    for entry in sorted(folder.glob(f"{stem}-*")) if folder.is_dir() else []:
        if entry.is_dir() and set(roles) <= set(entry.name.rsplit("-", 1)[1].split("+")):
            return entry
    return None


def cache_dir() -> Path:
    return CACHE_DIR


def prepared(recipe: dict, tokenizer, roles: tuple[str, ...], prepare, folder: Path | None = None):
    """``prepare(recipe, tokenizer, roles=roles)`` (a data.Prepared), from the cache when it holds the same data
    prepared the same way; ``.cached`` says which (the entry's key, or None)."""
    from runner.data.data import Prepared

    if not enabled(recipe):
        out = prepare(recipe, tokenizer, roles=roles)
        out.cached = None
        return out
    folder = Path(folder or cache_dir())
    name = key(recipe, tokenizer, roles, f"{prepare.__module__}.{prepare.__qualname__}")
    entry = _find(folder, name, roles)
    if entry is not None:
        try:
            out = _load(entry, Prepared, roles)
            os.utime(entry)  # used now: the last to be evicted
            out.cached = entry.name
            return out
        except Exception as exc:  # a damaged entry (a disk error, a file removed by hand): prepared again
            print(f"data: the cached entry {entry} does not load ({type(exc).__name__}); preparing again", flush=True)
            shutil.rmtree(entry, ignore_errors=True)
    out = prepare(recipe, tokenizer, roles=roles)
    try:
        _store(out, folder, name)
        evict(folder, cap_bytes())
    except OSError as exc:  # a full disk or a read-only cache folder costs the cache, not the run
        print(f"data: not cached ({exc.strerror or exc})", flush=True)
        out.cached = None
        return out
    out = _load(folder / name, Prepared, roles) if (folder / name).is_dir() else out  # memory-mapped: TRL's maps
    # cache their results beside it
    out.cached = None  # prepared by this run
    return out


def _store(out, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder))
    try:
        for role, ds in out.splits.items():
            ds.save_to_disk(str(tmp / role))
        meta = {"roles": list(out.splits), "stats": out.stats, "fingerprint": out.fingerprint, "written": time.time()}
        (tmp / META).write_text(json.dumps(meta, default=str))
        try:
            os.rename(tmp, folder / name)
        except OSError:
            if not (folder / name).is_dir():  # not another process's whole entry: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(entry: Path, prepared_class, roles: tuple[str, ...]):
    """The entry's ``roles``; the fingerprint is the entry's when it holds just those (else empty: the evaluation,
    which takes a run's entry for one of its roles, reads none)."""
    from datasets import load_from_disk

    meta = json.loads((entry / META).read_text())
    held = [role for role in meta["roles"] if role in roles]
    whole = set(meta["roles"]) == set(roles)
    out = prepared_class(stats={r: meta["stats"][r] for r in held}, fingerprint=meta["fingerprint"] if whole else "")
    out.splits = {role: load_from_disk(str(entry / role)) for role in held}
    return out


def cap_bytes() -> int:
    raw = os.environ.get(CAP_ENV, "")
    try:
        gb = float(raw) if raw.strip() else DEFAULT_CAP_GB
    except ValueError:
        raise RecipeError(CAP_ENV, f"is {raw!r}, not a number of GB", f"e.g. {CAP_ENV}=50, or unset it") from None
    return int(gb * 1e9)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def evict(folder: Path, cap: int) -> list[str]:
    """Remove the entries used longest ago until the folder is within ``cap`` bytes; returns their names."""
    entries = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime)
    sizes = {p: _size(p) for p in entries}
    total, removed = sum(sizes.values()), []
    for p in entries[:-1]:  # the newest entry stays, even alone over the cap
        if total <= cap:
            break
        shutil.rmtree(p, ignore_errors=True)
        total -= sizes[p]
        removed.append(p.name)
    return removed
