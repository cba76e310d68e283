"""What a trained output says about how it was trained, checked against the run that uses it.

``vistune sft`` and ``rl`` write ``vistune_run.json`` next to what they save (model type,
template, base model); peft writes ``adapter_config.json`` with the base model's name or
path.  A later run on that output should answer in the template it was trained with, and
should not put an adapter onto a base model of another type: peft would load it with
warnings at best, and at worst leave it silently unused.  Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs

from vistune.errors import VistuneError
from vistune.models import RUN_FILE, detect_model_type, hf_cache_snapshot, read_hf_config, read_run_file
from vistune.registry import Registries

ADAPTER_CONFIG = "adapter_config.json"


@attrs.frozen
class Recorded:
    """A value an output directory records, and the file that records it."""

    value: str
    file: Path


def recorded_template(directories: list[Path | None]) -> Recorded | None:
    """The template the first of ``directories`` with a run file recording one was trained with.

    :raises VistuneError: for a run file that is not valid JSON.
    """
    for directory in directories:
        if directory is None:
            continue
        run = read_run_file(directory)
        if run and isinstance(run.get("template"), str) and run["template"]:
            return Recorded(run["template"], directory / RUN_FILE)
    return None


def adapter_base_type(adapter_dir: Path, registries: Registries) -> tuple[Recorded | None, str]:
    """The model type ``adapter_dir`` was trained on, and why it is known (or why not).

    Sources in order: vistune's run file (``model_type``), then peft's ``adapter_config.json``
    (``base_model_name_or_path``, resolved as a local directory, a registered checkpoint
    alias's Hugging Face repo id, or that repo in the local Hugging Face cache).
    Returns ``(None, reason)`` when it cannot be told.
    """
    run = read_run_file(adapter_dir)
    if run and run.get("model_type"):
        return Recorded(str(run["model_type"]), adapter_dir / RUN_FILE), f"{RUN_FILE} records it"
    config_file = adapter_dir / ADAPTER_CONFIG
    try:
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        return None, f"{config_file} cannot be read ({type(exc).__name__})"
    if not isinstance(base, str) or not base:
        return None, f"{config_file} names no base_model_name_or_path"
    aliases = [a for a in registries.checkpoints if base in (a.hf_repo_id, a.name)]
    if len(aliases) == 1:
        how = f"its base_model_name_or_path {base!r} is checkpoint {aliases[0].name!r}"
        return Recorded(aliases[0].model_type, config_file), how
    directory = Path(base).expanduser()
    if not directory.is_absolute() and (adapter_dir / directory).is_dir():
        directory = adapter_dir / directory
    if not (directory / "config.json").is_file():
        directory = hf_cache_snapshot(base) if base.count("/") == 1 else None
    if directory is None:
        return None, f"its base_model_name_or_path {base!r} is not on this machine"
    try:
        model_type, how = detect_model_type(directory, registries.models)
    except VistuneError as exc:
        return None, f"the model type of its base_model_name_or_path {base!r} is unknown ({exc.message})"
    return Recorded(model_type.name, config_file), f"its base_model_name_or_path {base!r} is a {model_type.name} model"


def fits_model(base_type: str, model_dir: Path | None, model_type_name: str, registries: Registries) -> bool:
    """Whether an adapter trained on a ``base_type`` model loads onto the run's model.

    The same registered type fits.  Two types fit each other too when the run's checkpoint
    is of an architecture the adapter's type reads (``hf_model_types``): a plugin's variant
    of Llava (its own type over ordinary Llava checkpoints) takes an adapter trained as
    ``llava``, and the reverse.
    """
    if base_type == model_type_name:
        return True
    if model_dir is None or base_type not in registries.models:
        return False
    try:
        architecture = read_hf_config(model_dir).get("model_type")
    except VistuneError:
        return False
    return architecture in registries.models.get(base_type).hf_model_types
