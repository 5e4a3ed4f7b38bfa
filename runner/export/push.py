"""``runner push RECIPE --run DIR --repo NAME [--private] [--merged|--gguf]``: a finished run on the Hugging Face hub.

What goes up (``plan``): the model card as README.md, the adapter's files (or, with --merged / --gguf, what
``runner export`` makes of it) at the top of the repo, so ``PeftModel.from_pretrained(NAME)`` /
``from_pretrained(NAME)`` / ``ollama`` read them as they are; the run's record files under ``run/``. Before any
weight loads the hub is asked (``check_hub``): offline, not logged in, unreachable (exit 1) or a repo name already
taken (exit 2) each end in one line. The upload is one commit to a repo this command creates: it lands whole or
not at all, and a repo created for a commit that failed is deleted again, so nothing half-pushed looks done.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runner.common.errors import EnvironmentProblem, RecipeError, hub_unreachable, short
from runner.export import card, export

# The run's record, as far as it exists; uploaded under run/.
RECORD_FILES = ("recipe.yaml", "metrics.json", "report.md", "samples.md", "baselines.json", "env.json",
                "train_log.jsonl")
# Left out of the repo: the card is written fresh, export.json names local paths.
SKIPPED = ("README.md", "export.json")
# The record's text files name local folders (the recipe's resolved data and model paths, env.json's adapter
# chain): they go up with each absolute path cut to "<local>/<its last part>", so no user's home or layout leaks.
SCRUBBED = (".yaml", ".json", ".jsonl", ".md")
_ABSOLUTE = re.compile(r"(?<![\w:/.~-])(?:/[\w.+-]+){2,}")


@dataclass(frozen=True)
class Item:
    """One file of the upload: where it goes in the repo, and the local file (None: made by the export first)."""

    path_in_repo: str
    local: Path | None
    size: int | None
    data: bytes | None = None  # what goes up instead of the local file (a record file with its local paths cut)


def scrub(text: str) -> str:
    """``text`` with every absolute local path replaced by ``<local>/<its last part>``."""
    return _ABSOLUTE.sub(lambda m: "<local>/" + m.group(0).rsplit("/", 1)[-1], text)


def _record_item(path_in_repo: str, local: Path) -> Item:
    if local.suffix not in SCRUBBED:
        return Item(path_in_repo, local, local.stat().st_size)
    data = scrub(local.read_text(encoding="utf-8", errors="replace")).encode("utf-8")
    return Item(path_in_repo, local, len(data), data)


def check_repo(name: str) -> None:
    """``--repo``: ``owner/name`` or ``name`` as the hub accepts it (checked offline)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        raise RecipeError("--repo", f"{name!r} is not a hub repo name: {short(exc, 160)}",
                          "e.g. your-name/xsum-phi2-qlora (letters, digits, -, _, .)") from None


def plan(run_dir: Path, kind: str, staged: Path | None) -> list[Item]:
    """The files of the upload (the card, README.md, is added when it is written). ``kind``: adapter, merged or
    gguf; ``staged``: the export's folder (None before it is made: its files are then named by kind)."""
    items = []
    if kind == "adapter":
        source = run_dir / "adapter"
    else:
        source = staged
    if source is not None:
        for f in sorted(source.iterdir()):
            if f.is_file() and f.name not in SKIPPED:
                items.append(Item(f.name, f, f.stat().st_size))
    else:
        items.append(Item(f"<the {kind} export: runner export --format {'gguf' if kind == 'gguf' else 'hf'}>",
                          None, None))
    for name in RECORD_FILES:
        if (run_dir / name).is_file():
            items.append(_record_item(f"run/{name}", run_dir / name))
    for png in sorted((run_dir / "report").glob("*.png")):  # the plots report.md shows
        items.append(Item(f"run/report/{png.name}", png, png.stat().st_size))
    return items


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def plan_lines(items: list[Item], repo: str, private: bool) -> list[str]:
    total = sum(i.size or 0 for i in items)
    lines = [f"upload to {repo} ({'private' if private else 'public'}), one commit: README.md (the model card) and "
             f"{len(items)} files, {_size(total)}"]
    return lines + [f"  {i.path_in_repo}  {_size(i.size)}" for i in items]


def _offline() -> str | None:
    return next((v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
                 if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")), None)


def check_hub(repo: str):
    """Before anything is loaded or made: the hub reachable, a login, the repo name free. Returns (HfApi, the full
    repo id: ``owner/name``)."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    offline = _offline()
    if offline:
        raise EnvironmentProblem("runner push", f"offline: {offline} is set", f"unset {offline} and connect to "
                                 "the network; --dry-run shows the upload without the hub")
    token = get_token()
    if token is None:
        raise EnvironmentProblem("runner push", "not logged in to the Hugging Face hub",
                                 "run `hf auth login` or set HF_TOKEN to a token with write access")
    api = HfApi(token=token)
    try:
        owner = api.whoami()["name"]
        full = repo if "/" in repo else f"{owner}/{repo}"
        taken = api.repo_exists(full)
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise EnvironmentProblem("runner push", "the hub refused the token (401)",
                                     "log in again: hf auth login, or set HF_TOKEN to a valid token") from None
        raise EnvironmentProblem("runner push", f"the hub answered: {short(exc, 200)}", "try again later") from None
    except Exception as exc:
        unreachable = hub_unreachable(exc, "runner push", repo, "try again when the network is up")
        if unreachable is not None:
            raise unreachable from None
        raise
    if taken:
        raise RecipeError("--repo", f"{full} already exists on the hub", "choose another name; push never "
                          "writes into an existing repo")
    return api, full


def upload(api, repo: str, private: bool, items: list[Item], card_text: str, message: str) -> str:
    """Create ``repo`` and upload the card and ``items`` in one commit; returns the repo's URL. A failure after
    the repo was created deletes it again (nothing half-pushed stays)."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = api.create_repo(repo, private=private, exist_ok=False)
    except HfHubHTTPError as exc:
        if getattr(getattr(exc, "response", None), "status_code", None) == 409:
            raise RecipeError("--repo", f"{repo} already exists on the hub", "choose another name") from None
        raise _failed(exc, repo, "nothing was created") from None
    except Exception as exc:
        raise _failed(exc, repo, "nothing was created") from None
    operations = [CommitOperationAdd("README.md", card_text.encode("utf-8"))]
    operations += [CommitOperationAdd(i.path_in_repo, i.data if i.data is not None else str(i.local)) for i in items]
    try:
        api.create_commit(repo, operations, commit_message=message)
    except BaseException as exc:
        try:
            api.delete_repo(repo)
            left = "nothing was pushed: the new repo was deleted again"
        except Exception:
            left = f"the new repo {repo} may exist empty: delete it on the hub before pushing again"
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise _failed(exc, repo, left) from None
    return str(url)


def _failed(exc: BaseException, repo: str, left: str) -> EnvironmentProblem:
    unreachable = hub_unreachable(exc, "runner push", repo, "try again when the network is up")
    what = unreachable.problem if unreachable is not None else f"the upload failed: {short(exc, 200)}"
    return EnvironmentProblem("runner push", what, left)


def push(recipe: dict, run_dir: Path, repo: str, *, private: bool, kind: str, quant: str | None,
         dry_run: bool) -> str | None:
    """The whole command: checks, the export when pushing one, the upload; returns the repo's URL (None for a dry
    run, which prints the plan and the card and asks no hub)."""
    from runner.model import model

    export.refuse_launcher()
    check_repo(repo)
    if quant is not None and kind != "gguf":
        raise RecipeError("--quant", "applies to --gguf only", "add --gguf, or leave --quant out")
    tool = None
    if kind != "adapter":
        meta, _ = model.preflight(recipe)
        tool = export.check_format("gguf" if kind == "gguf" else "hf", quant, None, meta.config)
    if dry_run:
        print("\n".join(plan_lines(plan(run_dir, kind, None), repo, private)))
        print("\n" + card.render(recipe, run_dir, kind, repo=repo))
        return None
    api, full = check_hub(repo)  # offline, not logged in, name taken: before any weight loads
    scratch = Path(tempfile.mkdtemp(prefix="push-", dir=run_dir))  # the export, removed whatever happens
    try:
        staged, gguf_name = None, None
        if kind != "adapter":
            staged = scratch / "export"
            record = export.export(recipe, run_dir, staged, "gguf" if kind == "gguf" else "hf", quant, tool)
            print(export.summary(record, staged), flush=True)
            gguf_name = (record.get("gguf") or {}).get("file")
        items = plan(run_dir, kind, staged)
        print("\n".join(plan_lines(items, full, private)), flush=True)
        text = card.render(recipe, run_dir, kind, repo=full, gguf_name=gguf_name)
        return upload(api, full, private, items, text, f"{recipe['name']}: {kind} from runner push")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
