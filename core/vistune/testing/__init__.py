"""Helpers for testing vistune plugins: tiny offline models and contract checks.

Installed as a pytest plugin (entry point ``pytest11``), so its fixtures are available
in any test suite once vistune is installed.
"""
