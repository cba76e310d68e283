"""Helpers for testing vistune plugins: contract checks, and fixtures with tiny offline models.

The fixtures live in :mod:`vistune.testing.pytest_plugin`, which is installed as a pytest
plugin (entry point ``pytest11``), so they are available in any test suite once vistune is
installed.
"""

from vistune.testing.contracts import (
    ContractError,
    check_adapter,
    check_algorithm,
    check_backend,
    check_data_format,
    check_dataset,
    check_model_type,
    check_options,
    check_reward,
    check_template,
)

__all__ = [
    "ContractError",
    "check_adapter",
    "check_algorithm",
    "check_backend",
    "check_data_format",
    "check_dataset",
    "check_model_type",
    "check_options",
    "check_reward",
    "check_template",
]
