"""Checkpoints that are either complete or absent, and the resume policy.

A checkpoint is written into a hidden staging directory inside ``output_dir``; when
every file is written and flushed to disk, a marker file goes in last and the
directory is renamed to ``checkpoint-N`` in one ``os.replace``.  A crash at any
moment therefore leaves either no ``checkpoint-N`` or a complete one; a
``checkpoint-N`` without the marker (written by an older run or another tool) is
never resumed from.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from vistune.errors import ConfigError

PREFIX = "checkpoint"
#: Written last into a checkpoint: its presence means every other file is on disk.
COMPLETE_MARKER = "vistune_checkpoint_complete"
STAGING_PREFIX = ".staging-"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX}-(\d+)$")


def checkpoint_step(path: str | Path) -> int | None:
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def list_checkpoints(output_dir: str | Path, *, complete_only: bool = True) -> list[Path]:
    """``checkpoint-N`` directories in ``output_dir``, oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    if complete_only:
        found = [p for p in found if is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def staging_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{STAGING_PREFIX}{PREFIX}-{step}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(staged: Path, final: Path) -> Path:
    """Flush ``staged`` to disk, mark it complete and rename it to ``final`` atomically.

    An existing ``final`` (a leftover of a crashed run at the same step) is replaced.
    """
    for root, _, files in os.walk(staged):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))
    marker = staged / COMPLETE_MARKER
    marker.write_text(f"{final.name}\n")
    _fsync(marker)
    _fsync(staged)
    if final.exists():
        # os.replace cannot replace a non-empty directory: move the old one aside first,
        # so that a crash here still leaves at most one checkpoint-N, the old one or the new.
        trash = final.with_name(f"{STAGING_PREFIX}old-{final.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(staged, final)
    _fsync(final.parent)
    return final


def remove_stale_staging(output_dir: str | Path) -> None:
    """Delete staging directories a crashed run left behind."""
    root = Path(output_dir)
    if root.is_dir():
        for path in root.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


def rotate(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints; delete older ones and older incomplete ones."""
    if not keep:
        return []
    complete = list_checkpoints(output_dir)
    if len(complete) <= keep:
        return []
    oldest_kept = checkpoint_step(complete[-keep])
    doomed = [p for p in list_checkpoints(output_dir, complete_only=False) if checkpoint_step(p) < oldest_kept]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def resolve_resume(config, *, where: str = "resume", may_delete: bool = True) -> Path | None:
    """Apply ``resume`` / ``overwrite_output_dir`` to ``output_dir``; returns the checkpoint to resume from.

    Runs before any model is loaded, so a refused run costs nothing and loses nothing.
    ``may_delete`` is True in one process only (the global main one), so that the
    processes of a distributed run do not delete the same directories at once.
    """
    output_dir = Path(config.output_dir)
    resume = config.resume
    if resume == "auto":
        return latest_checkpoint(output_dir)
    if resume == "none":
        existing = list_checkpoints(output_dir, complete_only=False)
        if existing and not config.overwrite_output_dir:
            names = ", ".join(p.name for p in existing[-3:])
            raise ConfigError(
                f"{where}: resume is none, but {output_dir} already holds checkpoints ({names}); "
                "starting over would mix them with this run's",
                hint="set resume: auto to continue from the newest one, overwrite_output_dir: true to delete them "
                "and start over, or choose another output_dir",
            )
        if existing and may_delete:
            for path in existing:
                shutil.rmtree(path)
        return None
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{where}: resume is {resume!r}, which is neither auto, none nor a directory")
    if not is_complete(path) and not (path / "trainer_state.json").is_file():
        raise ConfigError(
            f"{where}: {path} is not a complete checkpoint (no {COMPLETE_MARKER} and no trainer_state.json)",
            hint=f"point resume at a checkpoint-N directory, or use resume: auto to pick the newest complete one in {output_dir}",
        )
    return path
