"""A model on the Hugging Face hub: asked once and at once, so that a hub id out of reach fails in a moment.

When a file is not in the local cache and the request for it fails to connect, huggingface_hub asks again with
backoff: five retries and 1 + 2 + 4 + 8 + 8 = 23 s of sleeping, which transformers' ``from_pretrained`` goes
through (``runner plan`` on a hub id took 26 s to fail on a machine without network). Before loading a hub id the
runner looks in the cache; where the file is not there, an offline setting (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, as
huggingface_hub reads them) fails at once without a request, and otherwise one request without retries tells
whether the hub answers. Any answer (found, not found, gated) goes on to ``from_pretrained``, which says it in its
own words.
"""

from __future__ import annotations

from pathlib import Path

from runner.common.errors import RecipeError, hub_out_of_reach, hub_unreachable


def check_model(recipe: dict) -> None:
    """model.name_or_path, when a hub id, is in the cache or the hub answers (check_reachable); a local folder (every
    local path recipe.load made absolute) is left to loading. Imports no more than huggingface_hub: a command may
    call it before torch loads."""
    src = recipe["model"]["name_or_path"]
    # A folder that exists is local, whatever its spelling: transformers' from_pretrained looks there first too.
    if not Path(src).is_absolute() and not Path(src).is_dir():
        check_reachable("model.name_or_path", src, recipe["model"]["revision"], "config.json", "use a local directory")


def check_reachable(key_path: str, hub_id: str, revision: str | None, filename: str, instead: str) -> None:
    """Raise EnvironmentProblem (exit 1) at once when ``hub_id``'s ``filename`` is neither in the local cache nor
    to be had from the hub: offline (no request made) or no connection (one request, no retries)."""
    from huggingface_hub import constants, file_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(hub_id, filename, revision=revision)
    except HFValidationError:
        raise RecipeError(key_path, f"{hub_id!r} is neither a local folder nor a hub id",
                          f"{instead}, or a hub id such as microsoft/phi-2") from None
    if cached is not None:
        return  # cached (or cached as missing): from_pretrained reads the cache, asking the hub only once if at all
    if constants.is_offline_mode():
        raise hub_out_of_reach(key_path, hub_id, instead)
    try:
        file_download.get_hf_file_metadata(hf_hub_url(hub_id, filename, revision=revision),
                                           timeout=constants.HF_HUB_ETAG_TIMEOUT, retry_on_errors=False)
    except Exception as exc:
        unreachable = hub_unreachable(exc, key_path, hub_id, instead)
        if unreachable is not None:
            raise unreachable from None
