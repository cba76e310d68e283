"""``vistune serve``: the plan's model behind an OpenAI-compatible HTTP API.

The engine is built (weights loaded) before the server listens, plugins extend the
application through ``vistune_server_started``, and uvicorn serves it until SIGINT or
SIGTERM, then finishes the requests in flight before the engine is closed.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from vistune.errors import ConfigError
from vistune.plan import Plan


def served_model_name(config: Any) -> str:
    """The model id clients send: ``served_model_name``, else ``model`` as the config names it."""
    return config.served_model_name or config.model


def build_app(plan: Plan, engine: Any) -> Any:
    """The application for ``engine``, after ``vistune_server_started`` has run."""
    from vistune.plugins import get_plugin_manager
    from vistune.serving.app import create_app

    app = create_app(engine, plan.config, model_name=served_model_name(plan.config))
    get_plugin_manager().hook.vistune_server_started(app=app, config=plan.config)
    return app


def run(plan: Plan) -> None:
    """Load the model and serve it on ``host:port`` until interrupted."""
    missing = [m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"vistune serve needs {', '.join(missing)}, which is not installed",
                          hint="pip install 'vistune[serve]'")  # fmt: skip
    from vistune.inference.backends import create_engine
    from vistune.serving.app import resolve_api_key
    from vistune.serving.server import serve

    config = plan.config
    engine = create_engine(plan)
    try:
        app = build_app(plan, engine)
    except BaseException:
        engine.close()
        raise
    auth = "API key required" if resolve_api_key(config) else "no API key"
    print(f"vistune serve: {served_model_name(config)} ({plan.backend.name} backend, {auth}) on "
          f"http://{config.host}:{config.port}/v1", file=sys.stderr, flush=True)  # fmt: skip
    serve(app, config.host, config.port)
