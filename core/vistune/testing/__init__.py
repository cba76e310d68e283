"""Helpers for testing vistune plugins: tiny offline models and contract checks.

Installed as a pytest plugin (entry point ``pytest11``), so its fixtures are available
in any test suite once vistune is installed.
"""

from vistune.testing.contracts import (
    ContractError,
    check_adapter,
    check_algorithm,
    check_backend,
    check_dataset,
    check_model_type,
    check_reward,
    check_template,
)

__all__ = [
    "ContractError",
    "check_adapter",
    "check_algorithm",
    "check_backend",
    "check_dataset",
    "check_model_type",
    "check_reward",
    "check_template",
]
