"""Shared by the core's tests."""

import pytest

#: The configuration users bring from other fine-tuning tools; vistune accepts it as written.
REFERENCE_CONFIG = """\
model: llava-v1.5-7b
task: sft
dataset: llava-instruct-en
quantization: q4_k_m
adapter: lora
lora_target_modules: [q_proj, v_proj]
parallel_method: ddp
gpu_num: 4
"""


@pytest.fixture
def reference_config_text() -> str:
    return REFERENCE_CONFIG
