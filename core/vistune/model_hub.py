"""Checkpoints from the Hugging Face Hub: whether the plan may download one, and the download.

The plan only decides (:func:`download_blocker`, :func:`describe_download`); nothing is
fetched while planning, so ``--dry-run`` stays offline.  The download itself
(:func:`download_model`) runs once the plan is ready, in the process that starts the run,
before anything heavy is imported.  It is ``huggingface_hub.snapshot_download``: the Hub's
own progress bar, resumable downloads, and the Hub's environment variables (``HF_ENDPOINT``,
``HF_HUB_OFFLINE``, ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_TOKEN``) as huggingface_hub reads them.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from vistune.errors import VistuneError

#: ``owner/name`` as the Hub spells repo ids.
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

#: Weight formats that transformers' PyTorch loaders never read: repos that carry them next to
#: safetensors would otherwise double or triple the download.
SKIPPED_FILES = ("*.msgpack", "*.h5", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.mlmodel", "*.gguf")


def looks_like_repo_id(name: str) -> bool:
    """``owner/name`` that is not a relative path (``./x/y``) or an absolute one."""
    return bool(REPO_ID.match(name)) and not name.startswith(".")


def manual_download_hint(repo_id: str, key: str = "model_path") -> str:
    """How to fetch a checkpoint by hand (the ``hf`` command that huggingface_hub installs)."""
    return f"download it with `hf download {repo_id} --local-dir DIR` and set {key}: DIR"


def download_blocker() -> str | None:
    """Why this machine will not download from the Hub (None: it will)."""
    if importlib.util.find_spec("huggingface_hub") is None:
        return "huggingface_hub is not installed (pip install huggingface_hub)"
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set, so nothing is downloaded"
    return None


def describe_download(repo_id: str) -> str:
    """The plan's line for a checkpoint the run will download: from where, to where."""
    from huggingface_hub import constants

    return f"not in the cache: will download {repo_id} from the hub ({constants.ENDPOINT}) into {constants.HF_HUB_CACHE}"


def download_model(repo_id: str) -> Path:
    """Download (or complete) ``repo_id``'s snapshot in the Hugging Face cache; returns its directory.

    :raises VistuneError: for a repo that does not exist, is gated or private without a token,
        or cannot be reached; the message says which, the hint names ``hf download``.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    print(f"vistune: downloading {repo_id} from the Hugging Face Hub", flush=True)
    try:
        return Path(snapshot_download(repo_id, ignore_patterns=list(SKIPPED_FILES)))
    except GatedRepoError:
        message = f"{repo_id} is a gated repository: accept its terms on its Hub page, then log in"
        hint = f"`hf auth login` (or set HF_TOKEN), then run again; or {manual_download_hint(repo_id)}"
    except RepositoryNotFoundError:
        message = f"{repo_id} is not a repository on the Hugging Face Hub (or it is private and no token was given)"
        hint = f"check the id on the Hub; for a private repo `hf auth login` (or set HF_TOKEN); or {manual_download_hint(repo_id)}"
    except LocalEntryNotFoundError as exc:
        reason = str(exc).splitlines()[-1] if str(exc) else "the Hub could not be reached"
        message = f"{repo_id} is not in the Hugging Face cache and could not be downloaded: {reason}"
        hint = manual_download_hint(repo_id) + " (on a machine that is online, then copy DIR here)"
    except HfHubHTTPError as exc:
        message = f"downloading {repo_id} failed: {exc}"
        hint = manual_download_hint(repo_id)
    raise VistuneError(message, hint=hint)
