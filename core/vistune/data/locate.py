"""Where a config's ``dataset`` lives: a local file/directory, or a registered alias."""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from vistune.registry import Registry
from vistune.data.formats import detected_source
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
    name: str, registry: Registry[Dataset], dataset_path: str | None = None, formats: Registry[DataFormat] | None = None
) -> DatasetLocation:
    """Where the dataset ``name`` (an alias, a local path or what a source format opens) lives.

    :param formats: the registered data formats (default: the process's plugins').
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
    data_root = os.environ.get("VISTUNE_DATA_DIR")
    tried = [
        ("dataset_path in the config", Path(dataset_path) if dataset_path else None),
        (f"environment variable {spec.env_var}", Path(os.environ[spec.env_var]) if os.environ.get(spec.env_var) else None),
        ("VISTUNE_DATA_DIR", Path(data_root) / spec.name if data_root else None),
    ]
    for how, root in tried:
        if root is None:
            continue
        data_file = root / spec.data_file  # an empty data_file names the directory itself
        if data_file.exists():
            return DatasetLocation(data_file, root / spec.image_dir, spec.format, spec, how=f"{how}: {root}")
        if how == "VISTUNE_DATA_DIR":  # a root for every dataset: one it lacks is generated there, or looked for on
            if spec.builder is not None:
                return DatasetLocation(data_file, root / spec.image_dir, spec.format, spec,
                                       how=f"generated locally into {root}", needs_build=True)  # fmt: skip
            continue
        return DatasetLocation(
            None, None, spec.format, spec,
            how=f"{how} points at {root}, but {data_file} does not exist",
            hint=_layout_hint(spec),
        )  # fmt: skip
    if spec.builder is not None:
        root = cache_dir() / "datasets" / spec.name
        data_file = root / spec.data_file
        return DatasetLocation(
            data_file, root / spec.image_dir, spec.format, spec,
            how=f"generated locally into {root}", needs_build=not data_file.exists(),
        )  # fmt: skip
    source = f"the Hugging Face dataset {spec.hf_repo_id}" if spec.hf_repo_id else "its files"
    return DatasetLocation(
        None, None, spec.format, spec,
        how=f"dataset {name!r} is not on this machine",
        hint=f"download {source} and set dataset_path (or {spec.env_var}) to its directory; " + _layout_hint(spec),
    )  # fmt: skip


def _layout_hint(spec: Dataset) -> str:
    layout = f"the directory must hold {spec.data_file or 'the records'}"
    if spec.image_dir:
        layout += f" and the images under {spec.image_dir}/"
    return layout
