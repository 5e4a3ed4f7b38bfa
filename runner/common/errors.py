"""The error types behind the one-line contract: every command ends normally or with one line
``error: <where>: <what> (<hint>)``; exit 2 when the user's input is wrong, exit 1 when the environment is
(disk full, read-only folder, out of memory, a dependency missing, the hub out of reach)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import traceback
from pathlib import Path

# How much of a foreign message (a library's, an OS's) goes into the one line.
MESSAGE_CHARS = 300
# The most of each part of an error line: a key path, a value or a key typed by mistake can be megabytes long.
WHERE_CHARS, PROBLEM_CHARS, HINT_CHARS = 120, 600, 600


class RecipeError(Exception):
    """A user mistake, reported as one line: ``error: <key.path>: <problem> (<hint>)``; exit status 2."""

    exit_code = 2

    def __init__(self, key_path: str, problem: str, hint: str | None = None):
        self.key_path = key_path
        self.problem = problem
        self.hint = hint
        super().__init__(self.line())

    def line(self) -> str:
        where = f"{clip(self.key_path, WHERE_CHARS)}: " if self.key_path else ""
        hint = f" ({clip(self.hint, HINT_CHARS)})" if self.hint else ""
        # one line, whatever the parts held, each at most a head...tail of what it quotes
        return " ".join(f"error: {where}{clip(self.problem, PROBLEM_CHARS)}{hint}".split())


class EnvironmentProblem(RecipeError):
    """The machine, not the recipe: disk full, a read-only folder, memory, a missing dependency; exit status 1."""

    exit_code = 1


def short(text: str, limit: int = MESSAGE_CHARS) -> str:
    """``text`` on one line, at most ``limit`` characters (its head and tail)."""
    return clip(" ".join(str(text).split()), limit)


def bad_text(value, where: str = "") -> str | None:
    """What in ``value`` (a string, or the strings of a JSON record) is no text a tokenizer or a file can take: a
    lone surrogate (half of a UTF-16 pair, which JSON's \\uXXXX escapes can write), said with its field; None when
    all of it encodes as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            char = value[exc.start]
            field = f"{where}: " if where else ""
            return f"{field}character {exc.start + 1} is a lone surrogate ({ascii(char)[1:-1]}), not text"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = bad_text(item, f"{where}.{key}" if where and isinstance(key, str) else
                         f"{where}[{key}]" if where else str(key))
        if found:
            return found
    return None


def clip(text, limit: int) -> str:
    """``text`` as it is when at most ``limit`` characters, else its head...tail in ``limit`` characters: what a
    message quotes of a value or a key the user typed stays short, whatever its length."""
    text = str(text)
    if len(text) <= limit:
        return text
    head = max(1, (limit - 3) * 2 // 3)
    return f"{text[:head]}...{text[len(text) - max(1, limit - 3 - head):]}"


# errno -> (what, hint) for the OS errors a run can meet while writing its folders.
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free some space, or write elsewhere with output_dir=DIR"),
    errno.EDQUOT: ("disk quota exceeded", "free some space, or write elsewhere with output_dir=DIR"),
    errno.EROFS: ("the file system is read-only", "write elsewhere with output_dir=DIR"),
    errno.EACCES: ("permission denied", "write elsewhere with output_dir=DIR, or fix the folder's permissions"),
    errno.EPERM: ("operation not permitted", "write elsewhere with output_dir=DIR, or fix the folder's permissions"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path, e.g. output_dir"),
    errno.EISDIR: ("is a folder, not a file", "check the path"),
    errno.ENAMETOOLONG: ("the path is too long", "choose a shorter output_dir or name"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n)"),
    errno.EIO: ("input/output error", "check the disk"),
    errno.ELOOP: ("a symbolic link loop (too many levels of symbolic links)", "fix or remove the link that points "
                  "back into its own path"),
}
# Where the libraries keep their caches: a failure to write there is the cache folder's, not the data's or the run's.
_CACHE_VARIABLES = ("HF_HOME", "HF_DATASETS_CACHE", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "XDG_CACHE_HOME",
                    "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR")
_CACHE_HINT = ("a cache folder (under HOME, or HF_HOME / HF_DATASETS_CACHE / XDG_CACHE_HOME) cannot be written: make "
               "it writable, or point HF_HOME and HF_DATASETS_CACHE at a writable folder")
# Python's and native threads' words for a thread that could not start (a process or user limit, or no memory).
_THREAD_START = re.compile(r"can't start new thread|pthread_create|Resource temporarily unavailable.*thread", re.I)


def _in_cache(filename: str) -> bool:
    """Whether ``filename`` is in a library's cache folder rather than where the user asked the runner to write."""
    roots = [os.environ.get(v) for v in _CACHE_VARIABLES] + [os.path.join(os.path.expanduser("~"), ".cache")]
    path = os.path.abspath(filename)
    return any(root and (path + os.sep).startswith(os.path.abspath(root) + os.sep) for root in roots)


def os_fault(exc: BaseException) -> RecipeError | None:
    """The machine's fault behind ``exc``, if an OS error of the kinds _OS_ERRORS names is in its chain: exit 1,
    named by the path; one in a cache folder says so (its hint is the cache's, not output_dir's). A path too long
    for the file system is the user's (exit 2): the runner makes no path the user did not choose the length of."""
    for item in _chain(exc):
        if isinstance(item, OSError) and item.errno in _OS_ERRORS:
            what, hint = _OS_ERRORS[item.errno]
            name = str(item.filename or "")
            if name and _in_cache(name) and item.errno != errno.ELOOP:
                hint = _CACHE_HINT
            if item.errno == errno.ENAMETOOLONG:  # a path the user wrote (a recipe value, output_dir, name): exit 2
                return RecipeError(short(name, 200), what, hint)
            return EnvironmentProblem(short(name, 200), what, hint)
    return None
# Libraries that write in native code (safetensors, torch.save) report the OS error only in their message.
_MESSAGES = [
    (re.compile(r"no space left|storagefull|enospc|file write failed", re.I), errno.ENOSPC),
    (re.compile(r"disk quota", re.I), errno.EDQUOT),
    (re.compile(r"read-only file system|readonlyfilesystem|erofs", re.I), errno.EROFS),
    (re.compile(r"permission denied|permissiondenied", re.I), errno.EACCES),
]


# A native writer (torch.save, safetensors) failing, whatever its message says of the reason.
_WRITE_FAILURE = re.compile(r"inline_container|PytorchStreamWriter|unexpected pos|IoError|failed writing", re.I)


# torch.compile's own failures (dynamo's and inductor's exception types) and CUDA graphs' (torch's message when a
# replay would read an output a later replay overwrote).
_COMPILER_MODULES = ("torch._dynamo", "torch._inductor")
_CUDA_GRAPHS = re.compile(r"CUDAGraphs|cudagraph", re.I)


def _compiler_failure(exc: BaseException) -> RecipeError | None:
    """torch.compile failing, named by the recipe key that turned it on: training's compiled layers, or the
    compiled evaluation backend (which of them raised it, by the runner module in the traceback)."""
    chain = list(_chain(exc))
    failed = next((item for item in chain if type(item).__module__.startswith(_COMPILER_MODULES)
                   or _CUDA_GRAPHS.search(str(item))), None)
    if failed is None:
        return None
    files = {Path(frame.filename).as_posix() for item in chain for frame in traceback.extract_tb(item.__traceback__)}
    what = f"torch.compile failed: {type(failed).__name__}: {short(failed, 200)}"
    if any(f.endswith("runner/evaluate/generate.py") for f in files):
        return EnvironmentProblem("generation.backend", what, "set generation.backend: merged (the same merged "
                                  "weights, not compiled)")
    if any(f.endswith("runner/train/train.py") for f in files):
        return EnvironmentProblem("training.compile", what, "set training.compile: false to train the decoder "
                                  "layers uncompiled, without CUDA graphs")
    return None


# The hub could not be asked for files that are not in the local cache (no network, or an offline setting):
# huggingface_hub's, datasets', requests' and httpx's exception types for it, matched by name (none is imported here).
_UNREACHABLE = frozenset({"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "Timeout",
                          "ConnectTimeout", "ReadTimeout", "TimeoutError", "ConnectError", "TimeoutException"})
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_unreachable(exc: BaseException, key_path: str, hub_id: str, instead: str) -> EnvironmentProblem | None:
    """Loading ``hub_id`` failed because the hub was out of reach: the machine's problem, not the recipe's (exit 1).
    ``instead``: what the recipe can use offline. None when ``exc`` says something else."""
    if not any(cls.__name__ in _UNREACHABLE for item in _chain(exc) for cls in type(item).__mro__):
        return None
    return hub_out_of_reach(key_path, hub_id, instead)


def hub_out_of_reach(key_path: str, hub_id: str, instead: str) -> EnvironmentProblem:
    """``hub_id`` is not in the local cache and the hub cannot be asked for it: an offline setting (named) or no
    network."""
    offline = [v for v in _OFFLINE_VARIABLES if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")]
    why = f"offline: {offline[0]} is set" if offline else "no network? HF_HUB_OFFLINE is not set"
    return EnvironmentProblem(key_path, f"cannot reach the Hugging Face hub for {short(hub_id, 80)!r} ({why}), "
                              "and it is not in the local cache",
                              f"connect to the network{f' and unset {offline[0]}' if offline else ''}, or {instead}")


# runner.evaluate.evaluate marks each user evaluator it builds with its recipe key and name under this attribute, so that a
# failure raised while one of its methods runs (evaluate, per_example, wherever called) is blamed on it.
USER_EVALUATOR = "_runner_recipe_key"


def _user_evaluator_failure(exc: BaseException) -> RecipeError | None:
    """An exception raised inside a user's own evaluator (a method of one is on the traceback), named by its
    recipe key: that code is the user's, not the runner's."""
    for item in _chain(exc):
        tb = item.__traceback__
        while tb is not None:
            where = getattr(tb.tb_frame.f_locals.get("self"), "__dict__", {}).get(USER_EVALUATOR)
            if where:
                return EnvironmentProblem(where, f"{type(item).__name__}: {short(item) or 'no message'}",
                                          "a bug in that evaluator; RUNNER_DEBUG=1 shows the traceback")
            tb = tb.tb_next
    return None


def _nearly_full(path: Path) -> bool:
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return False
    return usage.free < 4 * 2**20 or usage.free < usage.total // 1000


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def classify(exc: BaseException, written: tuple | list = ()) -> RecipeError:
    """The one-line error for any exception that escaped a command (RecipeError passes through unchanged).
    ``written``: the folders the command was writing, to tell a full disk behind a native writer's failure."""
    if isinstance(exc, RecipeError):
        return exc
    for item in _chain(exc):
        if isinstance(item, RecipeError):
            return item
    fault = os_fault(exc)
    if fault is not None:
        return fault
    for item in _chain(exc):
        if isinstance(item, RuntimeError) and _THREAD_START.search(str(item)):
            return EnvironmentProblem("threads", f"cannot start a thread: {short(item, 120)}",
                                      "the process's thread or memory limit is reached (ulimit -u, a container's "
                                      "pids or memory limit): raise it, or set training.num_threads lower")
        if isinstance(item, MemoryError) or type(item).__name__ == "OutOfMemoryError":
            return EnvironmentProblem("memory", "out of memory",
                                      "lower training.micro_batch_size, prompt.max_length or generation.batch_size, "
                                      "or use training.profile: low_memory")
        if isinstance(item, ModuleNotFoundError) and item.name:
            return EnvironmentProblem("dependency", f"module {item.name!r} is not installed",
                                      "install the runner's dependencies: make install, or pip install -e .")
        if isinstance(item, ImportError):
            return EnvironmentProblem("dependency", f"cannot import: {short(item)}",
                                      "reinstall the runner's dependencies: make install")
    text = " ".join(str(item) for item in _chain(exc))
    for pattern, code in _MESSAGES:
        if pattern.search(text):
            what, hint = _OS_ERRORS[code]
            return EnvironmentProblem("output", what, hint)
    if _WRITE_FAILURE.search(text):
        full = next((Path(p) for p in written if _nearly_full(Path(p))), None)
        if full is not None:
            return EnvironmentProblem(str(full), *_OS_ERRORS[errno.ENOSPC])
        return EnvironmentProblem("output", f"writing a file failed: {short(text, 200)}",
                                  "check the disk: free space, permissions")
    compiler = _compiler_failure(exc)
    if compiler is not None:
        return compiler
    user = _user_evaluator_failure(exc)
    if user is not None:
        return user
    return EnvironmentProblem("internal", f"{type(exc).__name__}: {short(exc) or 'no message'}",
                              "a bug in the runner or a library; RUNNER_DEBUG=1 shows the traceback")
