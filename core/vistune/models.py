"""Finding checkpoints on disk and deciding which model type they are.

Loading itself is the model type's ``loader``; this module only decides *what* to
load, and does so without importing torch so that ``--dry-run`` stays fast.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import attrs

from vistune.errors import RegistryError
from vistune.quantization import QuantizationScheme
from vistune.registry import Registry
from vistune.specs import ModelAlias, ModelType

#: Written next to every model vistune saves; records how it was trained.
RUN_FILE = "vistune_run.json"

#: How to add a model type vistune does not know, for error hints.
REGISTER_HINT = "register a new one with a plugin (PLUGINS.md, vistune_register_models)"


@attrs.frozen
class LoadOptions:
    """How a model type's loader should load a checkpoint."""

    dtype: str = "auto"
    device: str = "auto"
    attn_implementation: str | None = None
    quantization: QuantizationScheme | None = None
    #: The quantization scheme's option values (its ``options``, with the run's values).
    quantization_options: dict = attrs.field(factory=dict)
    trust_remote_code: bool = False
    #: Training loads keep the vision tower in full precision and enable input grads.
    for_training: bool = False


def text_config(config: Any) -> Any:
    """The language model's part of a loaded model's ``config`` (a VLM's ``text_config``; a text model's own)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def hf_cache_dir() -> Path:
    """Where huggingface_hub downloads to, found as ``huggingface_hub.constants`` finds it.

    Not imported from there: huggingface_hub is not a dependency of vistune's core, and it
    reads the environment once, at import.
    """
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def hf_cache_snapshot(repo_id: str) -> Path | None:
    """The snapshot of ``repo_id`` in the local Hugging Face cache, if one was downloaded."""
    repo_dir = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snapshot = repo_dir / "snapshots" / ref.read_text().strip()
        if (snapshot / "config.json").is_file():
            return snapshot
    snapshots = sorted((repo_dir / "snapshots").glob("*/config.json")) if repo_dir.is_dir() else []
    return snapshots[-1].parent if snapshots else None


def alias_locations(alias: ModelAlias, model_path: str | None) -> list[tuple[str, Path | None]]:
    """Where a checkpoint alias may live, in the order they are tried: (how, directory)."""
    models_dir = os.environ.get("VISTUNE_MODELS_DIR")
    return [
        ("model_path in the config", Path(model_path) if model_path else None),
        (f"environment variable {alias.env_var}", Path(os.environ[alias.env_var]) if os.environ.get(alias.env_var) else None),
        ("VISTUNE_MODELS_DIR", Path(models_dir) / alias.name if models_dir else None),
        (f"Hugging Face cache ({hf_cache_dir()})", hf_cache_snapshot(alias.hf_repo_id)),
    ]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path} is not valid JSON: {exc}") from None


def read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise RegistryError(
            f"{directory} has no config.json, so it is not a Hugging Face model directory",
            hint="point `model` at the directory that save_pretrained() wrote",
        )
    return _read_json(path)


def read_run_file(directory: Path) -> dict | None:
    path = directory / RUN_FILE
    return _read_json(path) if path.is_file() else None


def detect_model_type(directory: Path, models: Registry[ModelType], explicit: str | None = None) -> tuple[ModelType, str]:
    """Decide the model type of a checkpoint; returns the type and how it was decided.

    Order: the explicit ``model_type``; the type recorded in vistune's run file next
    to the checkpoint; ``config.json``'s ``architectures``, then its ``model_type``.

    :raises RegistryError: for a type that is not registered (named explicitly, or in the
        run file: a run file is never silently overruled by config.json), or a
        config.json that matches no type or several; the error lists the candidates.
    """
    if explicit:
        if explicit not in models:
            raise _unknown_type(f"model_type {explicit!r} is not registered", explicit, models)
        return models.get(explicit), "model_type in the config"
    run = read_run_file(directory)
    if run and run.get("model_type"):
        if run["model_type"] not in models:
            raise _unknown_type(
                f"{directory / RUN_FILE} records model_type {run['model_type']!r}, which no loaded plugin registers",
                run["model_type"],
                models,
                fix="install the plugin that registers it (`vistune plugins` shows what is loaded), or set model_type",
            )
        return models.get(run["model_type"]), f"{RUN_FILE} next to the checkpoint"
    hf_config = read_hf_config(directory)
    architectures = hf_config.get("architectures") or []
    for field, values, how in (
        ("architectures", set(architectures), f"config.json architectures {architectures}"),
        ("hf_model_types", {hf_config.get("model_type")}, f"config.json model_type {hf_config.get('model_type')!r}"),
    ):
        matches = [spec for spec in models if set(getattr(spec, field)) & values]
        if len(matches) == 1:
            return matches[0], how
        if len(matches) > 1:
            names = ", ".join(m.name for m in matches)
            raise RegistryError(
                f"{directory}: {how} matches several model types ({names})",
                hint=f"set model_type to one of them, or {REGISTER_HINT}",
            )
    raise RegistryError(
        f"{directory}: no registered model type matches config.json (architectures {architectures}, "
        f"model_type {hf_config.get('model_type')!r}); registered: {', '.join(models.names()) or 'none'}",
        hint=f"set model_type to one of the registered types, or {REGISTER_HINT}",
    )


def _unknown_type(message: str, name: str, models: Registry[ModelType], fix: str = "set model_type") -> RegistryError:
    close = difflib.get_close_matches(name, models.names(), n=3, cutoff=0.6)
    if close:
        message += f" (did you mean {' or '.join(repr(c) for c in close)}?)"
    message += f"; registered: {', '.join(models.names()) or 'none'}"
    return RegistryError(message, hint=f"{fix} to one of the registered types, or {REGISTER_HINT}")
