"""PLUGINS.md keeps its promises: every hook documented with its exact signature and tested, the quickstart runs."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import vistune.config
import vistune.plugins
import vistune.testing
from vistune import hookspecs, specs
from vistune.plugins import hook_names

ROOT = Path(__file__).parents[1]
GUIDE = (ROOT / "PLUGINS.md").read_text()


def section(heading: str, level: str = "###") -> str:
    """The text under ``{level} {heading}`` up to the next heading of that level or above."""
    match = re.search(rf"^{level} {re.escape(heading)}\n(.*?)(?=^#{{1,{len(level)}}} |\Z)", GUIDE, re.MULTILINE | re.DOTALL)
    assert match, f"PLUGINS.md has no '{level} {heading}' section"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def signature(name: str) -> str:
    # hookspecs.py uses postponed annotations, so inspect gives them as strings; drop the quotes
    return name + str(inspect.signature(getattr(hookspecs, name))).replace("'", "")


@pytest.mark.parametrize("name", hook_names())
def test_every_hookspec_is_documented_with_its_exact_signature(name):
    text = section(name)
    assert f"```python\n{signature(name)}\n```" in text
    doc = inspect.getdoc(getattr(hookspecs, name))
    assert doc.splitlines()[0].replace("``", "`") in text, "the docstring's summary line"
    assert re.findall(r"^- `(\w+)`:", text, re.MULTILINE) == list(inspect.signature(getattr(hookspecs, name)).parameters)
    assert "Returns nothing" in text and "Called " in text
    assert len(code_blocks(text, "python")) >= 2, "the signature and an example"


def test_every_hook_has_a_test_named_after_it():
    files = list((ROOT / "tests").rglob("*.py")) + list(ROOT.glob("plugins/*/tests/**/*.py"))
    tests = {name for path in files for name in re.findall(r"^\s*(?:async )?def (test_\w+)", path.read_text(), re.MULTILINE)}
    missing = [hook for hook in hook_names() if not any(t.startswith(f"test_{hook}") for t in tests)]
    assert not missing, f"hooks without a test named test_<hook>...: {missing}"


def test_every_python_example_compiles():
    for number, block in enumerate(code_blocks(GUIDE, "python")):
        if re.fullmatch(r"vistune_\w+\(.*\) -> None\n", block):  # a hook's signature heading
            block = f"def {block.strip()}: ..."
        compile(block, f"PLUGINS.md python block {number}", "exec")


@pytest.mark.parametrize("spec_class", [specs.ModelType, specs.ModelAlias, specs.Template, specs.Adapter,
                                        specs.Algorithm, specs.Reward, specs.Backend, specs.Dataset,
                                        specs.DataFormat])  # fmt: skip
def test_every_spec_field_is_documented(spec_class):
    text = section(spec_class.__name__)
    documented = re.findall(r"^\| `(\w+)` \|", text, re.MULTILINE)
    assert documented == [field.name for field in attrs.fields(spec_class)]


def test_every_contract_check_and_fixture_is_documented():
    text = section("Testing plugins", "##")
    for name in vistune.testing.__all__:
        if name.startswith("check_"):
            params = inspect.signature(getattr(vistune.testing, name)).parameters
            assert re.search(rf"`{name}\((.*?)\)`", text), name
            documented = re.search(rf"`{name}\((.*?)\)`", text).group(1)
            assert [p.strip().split("=")[0] for p in documented.split(",") if p.strip() not in ("*",)] == list(params)
    for fixture in ("plugin_manager", "register_plugin", "tiny_llama", "tiny_llava", "tiny_qwen2_vl"):
        assert f"`{fixture}`" in text


def test_every_loading_variable_is_documented():
    variables = set(re.findall(r"``(VISTUNE_\w+)``", vistune.plugins.__doc__))
    assert variables == {"VISTUNE_PLUGINS", "VISTUNE_BLOCK_PLUGINS", "VISTUNE_STRICT_PLUGINS", "VISTUNE_TRACE_HOOKS",
                         "VISTUNE_DEBUG_PLUGINS"}  # fmt: skip
    text = section("Loading control", "##")
    for variable in variables:
        assert f"| `{variable}` |" in text


# -- the quickstart, executed ----------------------------------------------------------


def _env(site: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISTUNE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def test_quickstart_plugin_installs_loads_and_scores(tmp_path):
    quickstart = section("Quickstart: a reward plugin in one file", "##")
    (plugin_code,) = code_blocks(quickstart, "python")
    (pyproject,) = code_blocks(quickstart, "toml")
    (console,) = code_blocks(quickstart, "console")
    (config_snippet,) = code_blocks(quickstart, "yaml")
    module = re.search(r'py-modules = \["(\w+)"\]', pyproject).group(1)
    package = tmp_path / "package"
    package.mkdir()
    (package / "pyproject.toml").write_text(pyproject)
    (package / f"{module}.py").write_text(plugin_code)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site), str(package)],
                   check=True, capture_output=True, text=True)  # fmt: skip

    def vistune_cli(*args, expect=0, **env):
        result = subprocess.run([sys.executable, "-m", "vistune", *args], capture_output=True, text=True,
                                env=_env(site, **env), cwd=tmp_path, timeout=120)  # fmt: skip
        assert result.returncode == expect, result.stderr
        return result.stdout

    # `vistune plugins` prints what the guide shows
    shown = console.split("$ vistune plugins\n", 1)[1]
    assert shown in vistune_cli("plugins", VISTUNE_STRICT_PLUGINS="1")
    (info,) = [i for i in json.loads(vistune_cli("plugins", "--json")) if i["name"] == "contains-answer"]
    assert info["distribution"] == "vistune-contains-answer" and info["registered"] == {"rewards": ["contains-answer"]}

    # the config snippet resolves against it
    (tmp_path / "run.yaml").write_text(config_snippet + "model: nowhere\n")
    plan = vistune_cli("rl", "--config", "run.yaml", "--dry-run", expect=2)  # no model, so not ready
    assert "contains-answer  [vistune-contains-answer] x 1" in plan

    # the guide's test file for the plugin passes under pytest, with vistune's fixtures
    testing = section("Testing plugins", "##")
    test_file = re.search(r"`(tests/test_\w+\.py)`", testing).group(1)
    (test_code,) = code_blocks(testing, "python")
    (package / test_file).parent.mkdir()
    (package / test_file).write_text(test_code)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                            capture_output=True, text=True, cwd=package, timeout=300,
                            env=_env(site, VISTUNE_STRICT_PLUGINS="1"))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


# -- README.md --------------------------------------------------------------------------

README = (ROOT / "README.md").read_text()


def test_readme_quickstart_is_exactly_the_two_make_commands():
    quickstart = re.search(r"^## Quickstart\n(.*?)^## ", README, re.MULTILINE | re.DOTALL).group(1)
    assert code_blocks(quickstart, "console") == ["make demo\nmake test\n"]
    makefile = (ROOT / "Makefile").read_text()
    assert "-m vistune demo" in makefile and "-m pytest" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("name", sorted(vistune.config.FIELDS))
def test_readme_documents_config_key(name):
    from vistune.config import FIELDS, default_value

    row = re.search(rf"^\| `{name}` \| (.*?) \|", README, re.MULTILINE)
    assert row, f"README.md's configuration reference has no row for {name}"
    default = default_value(name)
    shown = "–" if default is None else f"`{default!r}`" if isinstance(default, (list, dict)) else f"`{default}`"
    assert row.group(1) == shown, f"README.md gives {name} the default {row.group(1)}, the code {shown}"
    assert FIELDS[name].metadata["help"].replace("|", "\\|") in README
