"""``max_batch_size: auto``: the config value, the size it resolves to, and who goes by the resolved size."""

from __future__ import annotations

import types

import pytest

from vistune.config import RunConfig, build_config, load_config
from vistune.errors import ConfigError
from vistune.inference.batch_size import (
    CPU_BATCH_SIZE,
    ENGINE_CHOSEN,
    auto_batch_size,
    batch_size_of,
    kv_bytes_per_token,
    prefill_bytes,
    resolve,
)

GiB, MiB = 1024**3, 1024**2
PREFILL = 16384  # the transformers engine's MAX_PREFILL_TOKENS


def llava_7b_text_config():
    """Llava-1.5-7B's language model (Vicuna-7B): 32 layers, 32 KV heads of 128, a 4096-token context."""
    transformers = pytest.importorskip("transformers")
    text = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)  # fmt: skip
    return transformers.LlavaConfig(text_config=text.to_dict()).get_text_config()


def h200(used_gib: float) -> tuple[int, int]:
    """``(free, total)`` of a 140 GiB card with ``used_gib`` taken."""
    return int((140 - used_gib) * GiB), 140 * GiB


def auto(text_config, memory, max_model_len=4096, utilization=0.9):
    return auto_batch_size(text_config, dtype_bytes=2, max_model_len=max_model_len, memory=memory,
                           utilization=utilization, prefill_tokens=PREFILL)  # fmt: skip


# -- the formula -------------------------------------------------------------------------


def test_llava_7b_in_bfloat16_takes_half_a_mebibyte_of_kv_per_token():
    assert kv_bytes_per_token(llava_7b_text_config(), 2) == 2 * 32 * 32 * 128 * 2 == MiB // 2


def test_llava_7b_on_an_h200_fits_55_rows():
    # 0.9 * 140 GiB - 14 GiB used (weights, CUDA context) - 1.51 GiB for a 16384-token prefill
    # (16384 * (4 * 4096 + 3 * 11008) * 2 bytes) = 110.49 GiB; a row of 4096 tokens takes 2 GiB of KV
    config = llava_7b_text_config()
    assert prefill_bytes(config, 2, PREFILL) == 16384 * (4 * 4096 + 3 * 11008) * 2
    assert auto(config, h200(used_gib=14)) == 55
    assert auto(config, h200(used_gib=14), utilization=0.5) == 27  # 70 - 14 - 1.51 GiB: 54.49 / 2
    assert auto(config, h200(used_gib=14), max_model_len=2048) == 110  # rows of at most 2048 tokens: 1 GiB each


def test_grouped_query_attention_and_long_contexts():
    text = types.SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                 hidden_size=4096, intermediate_size=14336)  # fmt: skip
    assert kv_bytes_per_token(text, 2) == MiB // 8  # 4 times fewer KV heads than Llava-7B
    # a 32k context is budgeted as 4096 tokens a row: (126 - 14 - 16384 * 59392 * 2 / GiB) / 0.5 GiB
    assert auto(text, h200(used_gib=14), max_model_len=32768) == 220


def test_head_dim_and_kv_heads_default_from_the_attention_heads():
    text = types.SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, head_dim=None)
    assert kv_bytes_per_token(text, 4) == 2 * 2 * 4 * 16 * 4


def test_the_size_is_clamped_to_1_and_256():
    config = llava_7b_text_config()
    assert auto(config, h200(used_gib=130)) == 1  # less left than 0.9 of the card: still one row
    tiny = types.SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128)
    assert auto(tiny, h200(used_gib=1)) == 256


def test_without_cuda_or_model_sizes_auto_is_8():
    assert auto(llava_7b_text_config(), memory=None) == CPU_BATCH_SIZE == 8
    assert auto(types.SimpleNamespace(hidden_size=64), h200(used_gib=14)) == 8  # no layer or head counts


def test_resolve_keeps_a_number_and_sizes_auto_on_the_models_device():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=64)  # fmt: skip
    model = transformers.LlamaForCausalLM(config)  # on the CPU
    kwargs = {"max_model_len": 2048, "utilization": 0.9, "prefill_tokens": PREFILL}
    assert resolve(3, model, **kwargs) == 3
    assert resolve("auto", model, **kwargs) == 8
    assert not torch.cuda.is_available() or resolve("auto", model.cuda(), **kwargs) > 8


# -- the config value ------------------------------------------------------------------------


def test_max_batch_size_is_auto_by_default_and_takes_a_number_or_auto(tmp_path):
    assert build_config({"task": "serve"}).config.max_batch_size == "auto"
    assert build_config({"task": "serve", "max_batch_size": 16}).config.max_batch_size == 16
    assert build_config({"task": "infer", "max_batch_size": "AUTO"}).config.max_batch_size == "auto"
    assert load_config(None, ["--max_batch_size", "4"], task="serve").config.max_batch_size == 4
    path = tmp_path / "serve.yaml"
    path.write_text("max_batch_size: auto\n")
    assert load_config(str(path), task="serve").config.max_batch_size == "auto"


@pytest.mark.parametrize("bad, message", [
    (0, "max_batch_size must be at least 1, got 0"),
    (-2, "max_batch_size must be at least 1"),
    ("lots", "max_batch_size must be an integer or auto, got 'lots'"),
    (2.5, "max_batch_size must be an integer or auto"),
    (True, "max_batch_size must be an integer or auto"),
    (None, "max_batch_size must be an integer or auto"),
])  # fmt: skip
def test_other_values_are_refused_naming_the_key(bad, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"task": "serve", "max_batch_size": bad})


# -- who goes by the resolved size -------------------------------------------------------------


def test_limits_go_by_the_number_set_or_the_engines_resolved_one():
    engine = types.SimpleNamespace(max_batch_size=37)
    assert batch_size_of(engine, RunConfig(task="serve", max_batch_size=5)) == 5  # the engine was started with it
    assert batch_size_of(engine, RunConfig(task="serve")) == 37
    assert batch_size_of(object(), RunConfig(task="serve")) == ENGINE_CHOSEN  # an engine that does not say


def test_server_admits_the_engines_batch_plus_the_queue():
    pytest.importorskip("fastapi")
    from vistune.serving.app import create_app

    engine = types.SimpleNamespace(max_batch_size=37, max_model_len=4096)
    app = create_app(engine, RunConfig(task="serve", max_queue=10), model_name="m", owns_engine=False)
    assert app.state.admission.capacity == 47
    app = create_app(engine, RunConfig(task="serve", max_batch_size=2, max_queue=10), model_name="m", owns_engine=False)
    assert app.state.admission.capacity == 12


def test_transformers_engine_resolves_auto_once_the_model_is_loaded(tiny_llama):
    pytest.importorskip("torch")
    from vistune.inference.transformers_engine import TransformersEngine
    from vistune.plugins import get_plugin_manager

    model_type = get_plugin_manager().registries.models.get("causal-lm")
    engine = TransformersEngine(str(tiny_llama), model_type, RunConfig(task="serve", device="cpu"))
    try:
        assert engine.max_batch_size == 8  # auto on the CPU
    finally:
        engine.close()
