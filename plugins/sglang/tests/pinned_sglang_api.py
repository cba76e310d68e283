"""The part of SGLang's Python API that vistune's sglang engine uses, read from SGLang's source.

SGLang's engine runs only on CUDA and SGLang does not install cheaply on a CPU machine, so
CI checks vistune's translation and its stand-in for ``sglang.Engine`` against a pinned copy
of the signatures (``sglang_api.json``), read with ``ast`` from a released wheel without
importing it.  Where sglang imports, ``test_pinned_api_is_sglang_s_own`` checks the copy
against the installed package.  To pin another release::

    pip download sglang==X.Y.Z --no-deps -d /tmp/sglang
    python plugins/sglang/tests/pinned_sglang_api.py /tmp/sglang/sglang-X.Y.Z-*.whl > plugins/sglang/tests/sglang_api.json
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import zipfile
from pathlib import Path

PINNED = Path(__file__).with_name("sglang_api.json")
ENGINE = "sglang/srt/entrypoints/engine.py"
SAMPLING = "sglang/srt/sampling/sampling_params.py"
IO_STRUCT = "sglang/srt/managers/io_struct.py"
SERVER_ARG_FIELDS = "sglang/srt/arg_groups/fields/"
ENGINE_METHODS = ("async_generate", "async_load_lora_adapter", "shutdown")


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name)


def _parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, str | None]:
    """Parameter name -> its default as source text (None when it has none), ``self`` left out."""
    args = function.args
    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + [ast.unparse(d) for d in args.defaults]
    out = {a.arg: d for a, d in zip(positional, defaults)}
    out |= {a.arg: (ast.unparse(d) if d is not None else None) for a, d in zip(args.kwonlyargs, args.kw_defaults)}
    out.pop("self", None)
    return out


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    return next(n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name)


def _fields(cls: ast.ClassDef) -> dict[str, str | None]:
    """A dataclass's or msgspec struct's fields: name -> default as source text (None when it has none)."""
    return {n.target.id: (ast.unparse(n.value) if n.value is not None else None)
            for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}  # fmt: skip


def read_api(read: callable, names: list[str], version: str) -> dict:
    """The pinned API from SGLang's source files; ``read(path)`` gives a file's text, ``names`` all paths."""
    engine = _class(ast.parse(read(ENGINE)), "Engine")
    server_fields = set()
    for path in sorted(n for n in names if n.startswith(SERVER_ARG_FIELDS) and n.endswith(".py")):
        for node in ast.walk(ast.parse(read(path))):
            if isinstance(node, ast.ClassDef):
                server_fields.update(f for f in _fields(node) if not f.startswith("_"))
    return {
        "version": version,
        "Engine": {name: _parameters(_method(engine, name)) for name in ENGINE_METHODS},
        "SamplingParams": _fields(_class(ast.parse(read(SAMPLING)), "SamplingParams")),
        "GenerateReqInput": _fields(_class(ast.parse(read(IO_STRUCT)), "GenerateReqInput")),
        "ServerArgs": sorted(server_fields),
    }


def read_wheel(wheel: str | Path) -> dict:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        version = next(line.split(":", 1)[1].strip() for line in archive.read(metadata).decode().splitlines()
                       if line.startswith("Version:"))  # fmt: skip
        api = read_api(lambda path: archive.read(path).decode(), archive.namelist(), version)
    api["read_from"] = f"{Path(wheel).name} (sha256 {hashlib.sha256(Path(wheel).read_bytes()).hexdigest()})"
    return api


def read_installed(package_dir: str | Path) -> dict:
    """The same from an installed ``sglang`` package directory."""
    import importlib.metadata

    root = Path(package_dir).parent
    names = [str(p.relative_to(root)) for p in (root / "sglang").rglob("*.py")]
    return read_api(lambda path: (root / path).read_text(), names, importlib.metadata.version("sglang"))


def pinned() -> dict:
    return json.loads(PINNED.read_text())


if __name__ == "__main__":
    json.dump(read_wheel(sys.argv[1]), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
