"""Hugging Face Hub ids as model folders: `org/name` or `org/name@revision` -> a snapshot folder of the user's Hub
cache, fetched through huggingface_hub.

huggingface_hub decides everything a user has already configured for it: the cache (HF_HUB_CACHE / HF_HOME), the
token (HF_TOKEN or `hf auth login`, needed for gated and private models), the endpoint, and HF_HUB_OFFLINE (then
only what the cache holds, resolved through its refs/ files). A revision (branch, tag or commit) pins the snapshot.
The revision lives in the name (model.path: org/name@v1.0), so a run's recipe.yaml names the same snapshot for
every later export, eval or generate. Only what loading reads is fetched: configs, safetensors, tokenizer files
(pickle `.bin` only with allow_pickle); `estimate` fetches config.json alone. No torch here: estimate imports this.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ModelError

# org/name as the Hub spells a repository: letters, digits, `-`, `_`, `.`; never a path (`./x`, `~/x`, `/x`)
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
WEIGHTLESS = ["*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja", "tokenizer*"]  # configs, tokenizers, templates
# Mistral repos ship `consolidated.safetensors` beside the HF shards; Llama's `original/` holds Meta's own format
SKIP = ["consolidated*", "original/*"]


def parse(name: str) -> tuple[str, str | None] | None:
    """`org/name[@revision]` -> (repo id, revision or None); None when `name` is not written as a Hub id."""
    repo, sep, revision = str(name).partition("@")
    if not _REPO.match(repo) or ".." in repo or (sep and not revision.strip()):
        return None
    return repo, (revision.strip() or None)


def is_hub_id(name: str) -> bool:
    """Written as a Hub id and not an existing local path (a local folder `org/name` wins)."""
    return parse(name) is not None and not Path(name).expanduser().exists()


def _split(name: str) -> tuple[str, str | None]:
    parsed = parse(name)
    if parsed is None:
        raise ModelError(f"{name!r} is not a Hugging Face Hub id; write it as org/name or org/name@revision.")
    return parsed


def _fail(repo: str, revision: str | None, e: Exception) -> ModelError:
    """huggingface_hub's exceptions -> what the user does next."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    at = f"@{revision}" if revision else ""
    if isinstance(e, GatedRepoError):
        return ModelError(f"{repo} is gated: accept its licence on https://huggingface.co/{repo}, then log in "
                          "(`hf auth login`, or set HF_TOKEN) and run again.")
    if isinstance(e, RevisionNotFoundError):
        return ModelError(f"{repo} has no revision {revision!r}; pass a branch, tag or commit it has "
                          "(org/name@main).")
    if isinstance(e, RepositoryNotFoundError):
        return ModelError(f"{repo}: no local folder of that name, and no such model on the Hugging Face Hub (or it is "
                          "private: log in with `hf auth login` or set HF_TOKEN). Check the spelling, or pass a local "
                          "model folder.")
    if isinstance(e, LocalEntryNotFoundError) or constants.HF_HUB_OFFLINE:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached")
        return ModelError(f"{repo}{at}: no local folder of that name, and it is not in the Hugging Face cache "
                          f"({constants.HF_HUB_CACHE}) while {why}. "
                          f"Download it once while online (`hf download {repo}`"
                          f"{f' --revision {revision}' if revision else ''}), unset HF_HUB_OFFLINE, or pass a "
                          "local model folder.")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ModelError(f"{repo}{at} cannot be fetched from the Hugging Face Hub: {first}")


def snapshot(name: str, allow_pickle: bool = False) -> Path:
    """The local folder of Hub model `name` (downloaded on first use into the user's Hub cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, revision = _split(name)
    patterns = WEIGHTLESS + ["*.safetensors"] + (["*.bin"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, ignore_patterns=SKIP))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise _near_miss(repo, _fail(repo, revision, e)) from None


def _near_miss(repo: str, error: ModelError) -> ModelError:
    """`runs/demo2` (a mistyped run folder) reads like a Hub id: when its first part is a local folder, say first
    that the folder is not there, and what is."""
    parent = Path(repo.split("/")[0])
    if not parent.is_dir():
        return error
    here = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
    listing = ", ".join(here[:6]) + (f" (+{len(here) - 6} more)" if len(here) > 6 else "") if here else "nothing"
    return ModelError(f"no folder {repo} here ({parent}/ holds: {listing}). Read as a Hugging Face Hub id: {error}")


def file(name: str, filename: str) -> Path:
    """One file of Hub model `name` (`estimate` reads config.json alone: no weights downloaded)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    repo, revision = _split(name)
    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: not in the cache, offline
        raise _fail(repo, revision, e) from None
    except EntryNotFoundError:
        raise ModelError(f"{repo} has no {filename}, so it is not a Hugging Face transformers model.") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise _fail(repo, revision, e) from None
