"""pytest fixtures for plugin authors.

``register_plugin``
    Register a plugin object or module for the duration of one test.
``plugin_manager``
    The process-wide plugin manager (entry points loaded).
``tiny_llama``, ``tiny_llava``, ``tiny_llava_next``, ``tiny_qwen2_vl``, ``tiny_qwen2_5_vl``
    Directories of tiny, deterministic, random-weight checkpoints (built once and
    cached under ``VISTUNE_CACHE_DIR``), loadable with plain transformers.
"""

from __future__ import annotations

import itertools

import pytest

_counter = itertools.count()


@pytest.fixture
def plugin_manager():
    from vistune.plugins import get_plugin_manager

    return get_plugin_manager()


@pytest.fixture
def register_plugin(plugin_manager):
    """``register_plugin(obj, name=None, allow_errors=False) -> PluginInfo``; unregistered after the test.

    A plugin with problems (a misspelled hook, an invalid spec, a hook that raises) fails the
    test with vistune's message, unless ``allow_errors=True`` (tests of the error reporting).
    """
    names = []

    def register(plugin, name: str | None = None, allow_errors: bool = False):
        name = name or f"test-plugin-{next(_counter)}"
        names.append(name)
        info = plugin_manager.add_plugin(plugin, name=name, distribution="(test)")
        if info.errors and not allow_errors:
            pytest.fail("\n".join(info.errors), pytrace=False)
        return info

    yield register
    for name in names:
        plugin_manager.remove_plugin(name)


def _tiny(kind: str):
    @pytest.fixture(scope="session")
    def fixture():
        from vistune.tiny_models import tiny_model_path

        return tiny_model_path(kind)

    fixture.__doc__ = f"Directory of a tiny {kind} checkpoint."
    return fixture


tiny_llama = _tiny("llama")
tiny_llava = _tiny("llava")
tiny_llava_next = _tiny("llava-next")
tiny_qwen2_vl = _tiny("qwen2-vl")
tiny_qwen2_5_vl = _tiny("qwen2.5-vl")
