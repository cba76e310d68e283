"""Where a config's ``dataset`` lives: a local file/directory, or a registered alias."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from vistune.registry import Registry
from vistune.data.builders import changed_options, copy_name
from vistune.data.formats import detected_source
from vistune.options import describe, values_over_defaults
from vistune.specs import DataFormat, Dataset


def cache_dir() -> Path:
    """vistune's cache for things it generates (tiny models, embedded datasets)."""
    return Path(os.environ.get("VISTUNE_CACHE_DIR") or Path.home() / ".cache" / "vistune")


@attrs.frozen
class DatasetLocation:
    """The resolved dataset: its records file (or directory), image root and format."""

    #: The records file or directory, or what a source format opens (a hub id).
    data_file: Path | str | None
    image_dir: Path | None
    #: A registered record or source format, or ``records`` / ``None``: detected when read.
    format: str | None
    spec: Dataset | None = None
    #: How it was found, or, when ``data_file`` is None, what is missing and how to fix it.
    how: str = ""
    #: The builder must run first (embedded datasets are generated on first use).
    needs_build: bool = False
    hint: str | None = None
    #: The values of the dataset's options (defaults filled in): what its builder builds with.
    options: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def found(self) -> bool:
        return self.data_file is not None


def guess_format(path: str | Path, formats: Registry[DataFormat] | None = None) -> str:
    """The source format that claims ``path`` (a ``datasets`` directory, a hub id), or ``records``.

    ``records`` is a JSON/JSONL file whose records' formats are told apart one by one.

    :param formats: the registered data formats (default: the process's plugins').
    :raises DataError: when two source formats claim ``path``.
    """
    if formats is None:
        from vistune.data.readers import registered_formats

        formats = registered_formats()
    detected = detected_source(formats, str(path))
    return detected.name if detected is not None else "records"


def locate_dataset(
    name: str,
    registry: Registry[Dataset],
    dataset_path: str | None = None,
    formats: Registry[DataFormat] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> DatasetLocation:
    """Where the dataset ``name`` (an alias, a local path or what a source format opens) lives.

    A dataset vistune builds is built into a directory of the option values
    (:func:`vistune.data.builders.copy_name`), so a copy always matches the values it is read with.

    :param formats: the registered data formats (default: the process's plugins').
    :param options: the plugin options the config set, by section (``RunConfig.options``);
        the dataset's own section gives its option values.
    """
    if name not in registry:
        path = Path(name).expanduser()
        if not path.exists():
            opened = guess_format(name, formats)
            if opened != "records":  # a hub id, or another name a source format opens
                return DatasetLocation(name, None, opened, how=f"opened as {opened} when the run starts")
            looks_like_a_path = "/" in name or name.endswith((".json", ".jsonl"))
            how = f"{name} does not exist" if looks_like_a_path else registry.unknown_message(name)
            return DatasetLocation(None, None, None, how=how)
        fmt = guess_format(path, formats)
        if path.is_dir() and fmt == "records":
            candidates = sorted(path.glob("*.jsonl")) + sorted(path.glob("*.json"))
            if not candidates:
                return DatasetLocation(None, None, None, how=f"{path} holds no .json/.jsonl records file")
            path = candidates[0]
        return DatasetLocation(path, path.parent if path.is_file() else path, fmt, how="local path")
    spec = registry.get(name)
    values = values_over_defaults((options or {}).get(spec.name, {}), spec.options)
    built = copy_name(spec, values) if spec.builder is not None else spec.name
    for_values = f" for {describe(changed_options(spec, values))}" if built != spec.name else ""
    data_root = os.environ.get("VISTUNE_DATA_DIR")
    tried = [
        ("dataset_path in the config", Path(dataset_path) if dataset_path else None),
        (f"environment variable {spec.env_var}", Path(os.environ[spec.env_var]) if os.environ.get(spec.env_var) else None),
        ("VISTUNE_DATA_DIR", Path(data_root) / built if data_root else None),
    ]
    for how, root in tried:
        if root is None:
            continue
        data_file = root / spec.data_file  # an empty data_file names the directory itself
        if data_file.exists():
            found = f"{how}: {root}"
            if how != "VISTUNE_DATA_DIR" and for_values:  # the user's own copy: vistune cannot tell how it was built
                found += f"; used as it is, the options{for_values.removeprefix(' for')} apply to copies vistune builds"
            return DatasetLocation(data_file, root / spec.image_dir, spec.format, spec, how=found,
                                   options=values)  # fmt: skip
        if how == "VISTUNE_DATA_DIR":  # a root for every dataset: one it lacks is generated there, or looked for on
            if spec.builder is not None:
                return DatasetLocation(data_file, root / spec.image_dir, spec.format, spec,
                                       how=f"generated locally into {root}{for_values}", needs_build=True,
                                       options=values)  # fmt: skip
            continue
        return DatasetLocation(
            None, None, spec.format, spec,
            how=f"{how} points at {root}, but {data_file} does not exist",
            hint=_layout_hint(spec), options=values,
        )  # fmt: skip
    if spec.builder is not None:
        root = cache_dir() / "datasets" / built
        data_file = root / spec.data_file
        return DatasetLocation(
            data_file, root / spec.image_dir, spec.format, spec,
            how=f"generated locally into {root}{for_values}", needs_build=not data_file.exists(), options=values,
        )  # fmt: skip
    source = f"the Hugging Face dataset {spec.hf_repo_id}" if spec.hf_repo_id else "its files"
    return DatasetLocation(
        None, None, spec.format, spec, options=values,
        how=f"dataset {name!r} is not on this machine",
        hint=f"download {source} and set dataset_path (or {spec.env_var}) to its directory; " + _layout_hint(spec),
    )  # fmt: skip


def _layout_hint(spec: Dataset) -> str:
    layout = f"the directory must hold {spec.data_file or 'the records'}"
    if spec.image_dir:
        layout += f" and the images under {spec.image_dir}/"
    return layout
