"""Real plugin distributions, pip-installed into a temporary directory and found through entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from vistune.errors import PluginError
from vistune.plugins import PluginManager

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "{version}"
dependencies = ["vistune"]

[project.entry-points.vistune]
{entry_point} = "{module}"

[tool.setuptools]
py-modules = ["{module}"]
"""

LENGTH_PLUGIN = '''
"""Scores a completion by its length: a reward with one option."""

from vistune import hookimpl
from vistune.specs import Reward


def make_length_reward(max_chars=20):
    def length(prompts, completions, **columns):
        return [min(len(c), max_chars) / max_chars for c in completions]

    return length


@hookimpl
def vistune_register_rewards(register):
    register(Reward("test-length", factory="vistune_test_length:make_length_reward", description="length / max_chars"))
'''

BROKEN_PLUGIN = '''
raise ImportError("vistune_test_broken needs a library that is not installed")
'''

# Same entry-point name as one of vistune's own default plugins.
CLASH_PLUGIN = '''
from vistune import hookimpl
from vistune.specs import Adapter


@hookimpl
def vistune_register_adapters(register):
    register(Adapter("clash-adapter", apply="vistune_test_clash:apply"))
'''

PACKAGES = [
    ("vistune-test-length", "1.2.3", "test-length", "vistune_test_length", LENGTH_PLUGIN),
    ("vistune-test-broken", "0.0.1", "test-broken", "vistune_test_broken", BROKEN_PLUGIN),
    ("vistune-test-clash", "0.1.0", "adapters", "vistune_test_clash", CLASH_PLUGIN),
]


def make_package(root: Path, dist: str, version: str, entry_point: str, module: str, code: str) -> Path:
    package = root / dist
    package.mkdir(parents=True)
    (package / "pyproject.toml").write_text(PYPROJECT.format(dist=dist, version=version, entry_point=entry_point,
                                                             module=module))  # fmt: skip
    (package / f"{module}.py").write_text(code)
    return package


def pip_install_target(packages: list[Path], site: Path) -> None:
    """Install built packages into ``site`` only: nothing outside the test's directory changes."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "--no-index", "--target", str(site), *map(str, packages)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip


def run_vistune(site: Path, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VISTUNE_")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), environment.get("PYTHONPATH")]))
    environment.update(env)
    return subprocess.run([sys.executable, "-m", "vistune", *args], capture_output=True, text=True, env=environment,
                          cwd=cwd, timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugin-packages")
    pip_install_target([make_package(root, *package) for package in PACKAGES], root / "site")
    return root / "site"


@pytest.fixture
def site_on_path(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    for name in ("VISTUNE_PLUGINS", "VISTUNE_BLOCK_PLUGINS", "VISTUNE_STRICT_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    return site


def test_installed_plugin_is_discovered_with_its_distribution_and_version(site):
    result = run_vistune(site, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    infos = {info["name"]: info for info in json.loads(result.stdout)}
    assert set(infos["test-length"]) >= {"name", "distribution", "version", "hooks", "registered"}
    assert infos["test-length"] == {
        "name": "test-length",
        "distribution": "vistune-test-length",
        "version": "1.2.3",
        "hooks": ["vistune_register_rewards"],
        "registered": {"rewards": ["test-length"]},
        "errors": [],
        "loaded": True,
    }
    core = {info["name"] for info in json.loads(result.stdout) if info["distribution"] == "vistune" and info["loaded"]}
    assert {"adapters", "causal-lm", "transformers-backend"} <= core  # the core plugins keep working


def test_a_plugin_that_fails_to_import_is_named_and_the_cli_still_works(site):
    result = run_vistune(site, "plugins", "--json")
    infos = {info["name"]: info for info in json.loads(result.stdout)}
    broken = infos["test-broken"]
    assert broken["loaded"] is False and broken["distribution"] == "vistune-test-broken"
    assert broken["errors"] == [
        "plugin 'test-broken' from distribution 'vistune-test-broken' failed to import (vistune_test_broken): "
        "ImportError: vistune_test_broken needs a library that is not installed"
    ]
    text = run_vistune(site, "plugins")
    assert text.returncode == 0
    assert "test-broken  (vistune-test-broken 0.0.1)  BROKEN" in text.stdout
    listed = run_vistune(site, "list", "rewards", "--json")
    assert listed.returncode == 0
    assert "warning: plugin 'test-broken' from distribution 'vistune-test-broken' failed to import" in listed.stderr
    rows = [row for row in json.loads(listed.stdout) if row["name"] == "test-length"]
    assert rows == [{"kind": "rewards", "name": "test-length", "description": "length / max_chars",
                     "plugin": "test-length", "distribution": "vistune-test-length"}]  # fmt: skip


def test_strict_mode_fails_with_exit_2_naming_the_broken_plugin(site):
    result = run_vistune(site, "plugins", VISTUNE_STRICT_PLUGINS="1", VISTUNE_PLUGINS="vistune-test-broken")
    assert result.returncode == 2
    assert result.stderr.startswith("error: plugin 'test-broken' from distribution 'vistune-test-broken' failed to import")
    assert "Traceback" not in result.stderr
    blocked = run_vistune(site, "plugins", VISTUNE_STRICT_PLUGINS="1", VISTUNE_PLUGINS="test-length")
    assert blocked.returncode == 0, blocked.stderr


def test_dry_run_resolves_a_reward_from_an_installed_plugin(site, tmp_path):
    config = tmp_path / "rl.yaml"
    config.write_text("model: missing-model-dir\ndataset: data.jsonl\nrewards:\n  - {name: test-length, weight: 0.5}\n")
    result = run_vistune(site, "rl", "--config", str(config), "--dry-run", VISTUNE_PLUGINS="vistune_test_length")
    assert result.returncode == 2, result.stderr  # printed, but not ready
    assert "test-length  [vistune-test-length] x 0.5" in result.stdout
    assert "rewards:" not in result.stdout  # no problem reported on the rewards field
    assert "not ready" in result.stdout  # the model and dataset are missing, and said so
    real = run_vistune(site, "rl", "--config", str(config), VISTUNE_PLUGINS="vistune_test_length")
    assert real.returncode == 2
    assert real.stderr.startswith("error: the run cannot start") and "Traceback" not in real.stderr


def test_installed_reward_scores_through_the_contract(site):
    code = textwrap.dedent("""
        from vistune.plugins import get_plugin_manager
        from vistune.testing import check_reward
        spec = get_plugin_manager().registries.rewards.get("test-length")
        print(check_reward(spec, ["p", "p"], ["12345", "x" * 50], options={"max_chars": 10}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISTUNE_")}
    env["PYTHONPATH"] = str(site)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0.5, 1.0]"


def test_allow_list_loads_only_the_named_plugins_plus_the_core(site_on_path, monkeypatch):
    monkeypatch.setenv("VISTUNE_PLUGINS", "Vistune_Test_Length")  # distribution names match in normal form
    pm = PluginManager()
    pm.load_entry_points()
    assert "test-length" in pm.infos and "test-broken" not in pm.infos
    assert {info.distribution for info in pm.infos.values()} == {"vistune", "vistune-test-length"}
    assert "lora" in pm.registries.adapters and not pm.errors()


def test_block_list_skips_plugins_including_the_core_ones(site_on_path, monkeypatch):
    monkeypatch.setenv("VISTUNE_BLOCK_PLUGINS", "test-broken, vistune-test-clash,transformers-backend")
    pm = PluginManager()
    pm.load_entry_points()
    assert "test-broken" not in pm.infos and "transformers-backend" not in pm.infos
    assert "transformers" not in pm.registries.backends
    assert not [e for e in pm.errors() if "vistune-test" in e]


def test_two_distributions_with_one_entry_point_name_keep_the_core_one(site_on_path):
    pm = PluginManager()
    pm.load_entry_points()
    assert pm.infos["adapters"].distribution == "vistune"
    assert "lora" in pm.registries.adapters and "clash-adapter" not in pm.registries.adapters
    clash = pm.infos["adapters (vistune-test-clash)"]
    assert clash.errors == [
        "plugin 'adapters' from distribution 'vistune-test-clash' is not loaded: distribution 'vistune' already "
        "provides a plugin named 'adapters' (hint: rename one of the entry points, or block one with "
        "VISTUNE_BLOCK_PLUGINS)"
    ]


def test_strict_mode_in_process_raises_plugin_error(site_on_path, monkeypatch):
    monkeypatch.setenv("VISTUNE_STRICT_PLUGINS", "1")
    monkeypatch.setenv("VISTUNE_PLUGINS", "test-broken")
    with pytest.raises(PluginError, match="'vistune-test-broken' failed to import"):
        PluginManager().load_entry_points()
