"""Qwen2-VL and Qwen2.5-VL for vistune: model types, checkpoint aliases and the ChatML template.

Nothing heavy is imported here: vistune loads :mod:`vistune_qwen_vl.plugin` at discovery.
"""

__version__ = "0.1.0"
