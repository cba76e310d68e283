"""vistune: fine-tune, RL-align and serve vision-language models from one YAML file.

This module stays import-light on purpose: plugins import ``hookimpl`` from here at
discovery time, and ``vistune --help`` / ``vistune plugins`` must not pull in torch.
"""

import pluggy

__version__ = "0.1.0"

#: Version of the hook API.  It is raised only when a hookspec changes in a way that
#: breaks existing plugins (a new optional hook or argument does not raise it).  A
#: plugin module may declare ``VISTUNE_HOOK_API = N``; core refuses plugins that ask
#: for a newer API than it provides.
HOOK_API_VERSION = 1

#: Entry-point group that every plugin, first-party or not, registers under.
ENTRY_POINT_GROUP = "vistune"

hookspec = pluggy.HookspecMarker("vistune")
hookimpl = pluggy.HookimplMarker("vistune")

__all__ = ["ENTRY_POINT_GROUP", "HOOK_API_VERSION", "__version__", "hookimpl", "hookspec"]
