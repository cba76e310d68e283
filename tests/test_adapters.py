"""The built-in adapters: what each one trains, where LoRA goes, GaLore's optimizer, QLoRA's refusal on CPU."""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from vistune.adapters.galore import trainer_overrides  # noqa: E402
from vistune.adapters.lora import apply_lora, apply_qlora, lora_config, merge_lora  # noqa: E402
from vistune.adapters.targets import lora_target_names, part_of  # noqa: E402
from vistune.config import build_config  # noqa: E402
from vistune.errors import ConfigError, VistuneError  # noqa: E402
from vistune.specs import ModelType  # noqa: E402
from vistune.testing import check_adapter  # noqa: E402

LLAVA = ModelType(
    "test-llava", loader="transformers:AutoModelForImageTextToText", default_template="test",
    vision_tower=("model.vision_tower",), projector=("model.multi_modal_projector",),
    language_model=("model.language_model", "lm_head"), supports_packing=True,
)  # fmt: skip
QWEN2_VL = ModelType(
    "test-qwen2-vl", loader="transformers:AutoModelForImageTextToText", default_template="test",
    vision_tower=("model.visual",), projector=("model.visual.merger",),
    language_model=("model.language_model", "lm_head"), supports_packing=True,
)  # fmt: skip
CAUSAL_LM = ModelType("test-causal-lm", loader="transformers:AutoModelForCausalLM", default_template="test",
                      language_model=("model", "lm_head"))  # fmt: skip


def config(**values):
    return build_config({"task": "sft", **values}).config


def load(path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoConfig

    auto = (
        AutoModelForImageTextToText if AutoConfig.from_pretrained(path).model_type != "llama" else AutoModelForCausalLM
    )
    return auto.from_pretrained(path, dtype=torch.float32)


def adapted(model):
    """Names (in the plain model) of the modules that carry a LoRA adapter."""
    return {
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})
    }


def trainable(model):
    return {name.removeprefix("base_model.model.") for name, p in model.named_parameters() if p.requires_grad}


def adapter_spec(plugin_manager, name):
    return plugin_manager.registries.adapters.get(name)


# -- LoRA targets ----------------------------------------------------------------------


def test_lora_q_v_stays_out_of_the_clip_tower_by_default(tiny_llava, plugin_manager):
    model = check_adapter(adapter_spec(plugin_manager, "lora"), load(tiny_llava), LLAVA, config())
    names = adapted(model)
    assert "model.language_model.layers.0.self_attn.q_proj" in names
    assert "model.language_model.layers.1.self_attn.v_proj" in names
    assert not any(n.startswith("model.vision_tower.") for n in names)
    assert "model.vision_tower.encoder.layers.0.self_attn.q_proj" not in names
    assert len(names) == 4  # q and v in each of the 2 decoder layers
    assert all(".lora_" in n for n in trainable(model))


def test_lora_scope_all_reaches_the_clip_tower(tiny_llava):
    model = apply_lora(load(tiny_llava), LLAVA, config(lora_scope="all"))
    names = adapted(model)
    assert "model.vision_tower.encoder.layers.0.self_attn.q_proj" in names
    assert "model.language_model.layers.0.self_attn.q_proj" in names


def test_all_linear_covers_the_language_model_but_not_lm_head(tiny_llava):
    model = load(tiny_llava)
    names = lora_target_names(model, LLAVA, config(lora_target_modules=["all-linear"]))
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(n.startswith("model.language_model.") for n in names)
    everything = lora_target_names(model, LLAVA, config(lora_target_modules=["all-linear"], lora_scope="all"))
    assert "lm_head" not in everything
    assert "model.multi_modal_projector.linear_1" in everything
    assert "model.vision_tower.encoder.layers.1.mlp.fc2" in everything


def test_the_peft_regex_selects_exactly_the_resolved_modules(tiny_qwen2_vl):
    model = load(tiny_qwen2_vl)
    for scope in ("language_model", "all"):
        cfg = config(lora_target_modules=["all-linear"], lora_scope=scope)
        names = set(lora_target_names(model, QWEN2_VL, cfg))
        pattern = lora_config(model, QWEN2_VL, cfg).target_modules
        matched = {n for n, _ in model.named_modules() if re.fullmatch(pattern, n)}
        assert matched == names
        # Qwen2-VL's patch embedding is a Conv3d named "proj": never an all-linear target
        assert "model.visual.patch_embed.proj" not in matched
    assert any(n.startswith("model.visual.merger.") for n in names)


def test_nested_projector_belongs_to_the_projector():
    assert part_of("model.visual.merger.mlp.0.weight", QWEN2_VL) == "projector"
    assert part_of("model.visual.blocks.0.attn.qkv.weight", QWEN2_VL) == "vision_tower"
    assert part_of("lm_head.weight", QWEN2_VL) == "language_model"
    # a module under no named prefix trains with the language model, but is never a LoRA target
    assert part_of("model.extra.proj", QWEN2_VL) == "language_model"
    assert part_of("model.extra.proj", QWEN2_VL, strict=True) is None
    assert part_of("model.layers.0.mlp", CAUSAL_LM, strict=True) == "language_model"


def test_unknown_target_module_is_an_error_naming_it(tiny_llava):
    with pytest.raises(ConfigError, match=r"'qkv_proj' matches no module.*") as info:
        lora_target_names(load(tiny_llava), LLAVA, config(lora_target_modules=["q_proj", "qkv_proj"]))
    assert "q_proj" in info.value.hint  # lists what exists


def test_lora_projector_trained_in_full_when_asked(tiny_llava, tmp_path):
    model = apply_lora(load(tiny_llava), LLAVA, config(freeze_projector=False))
    names = trainable(model)
    assert any(n.startswith("model.multi_modal_projector.modules_to_save.") for n in names)
    assert not any(n.startswith("model.vision_tower.") for n in names)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert any("multi_modal_projector" in k for k in f.keys())


def test_lora_vision_tower_trained_in_full_when_asked(tiny_llava, plugin_manager):
    model = check_adapter(adapter_spec(plugin_manager, "lora"), load(tiny_llava), LLAVA,
                          config(freeze_vision_tower=False))  # fmt: skip
    names = trainable(model)
    assert any(n.startswith("model.vision_tower.modules_to_save.") for n in names)
    assert not any(n.startswith("model.multi_modal_projector.") for n in names)  # still frozen under LoRA
    assert not any(n.startswith("model.vision_tower.") for n in adapted(model))  # trained whole, not adapted


def test_dora_adds_magnitudes(tiny_llava, plugin_manager):
    model = check_adapter(adapter_spec(plugin_manager, "dora"), load(tiny_llava), LLAVA, config(adapter="dora"))
    assert any("lora_magnitude_vector" in n for n in trainable(model))


def test_lora_on_a_text_model(tiny_llama, plugin_manager):
    model = check_adapter(adapter_spec(plugin_manager, "lora"), load(tiny_llama), CAUSAL_LM, config())
    assert adapted(model) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}


def test_merge_lora_gives_a_plain_model_with_the_same_outputs(tiny_llama):
    model = apply_lora(load(tiny_llama), CAUSAL_LM, config())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)  # a trained adapter: B is no longer zero
    model.eval()
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        merged = merge_lora(model)
        got = merged(input_ids=ids).logits
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_qlora_refuses_cpu_before_touching_the_model():
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the model was used ({name})")

    with pytest.raises(VistuneError, match="qlora needs a CUDA GPU"):
        apply_qlora(Untouchable(), LLAVA, config(adapter="qlora", quantization="nf4"))


def test_qlora_problems_are_found_by_the_plan_before_any_weights_load(plugin_manager, monkeypatch):
    from vistune.plan import make_plan

    def adapter_problems(gpus, **values):
        monkeypatch.setattr("vistune.plan.visible_gpu_count", lambda: gpus)
        loaded = build_config({"task": "sft", "model": "nowhere", "adapter": "qlora", **values})
        plan = make_plan(loaded, plugin_manager)
        return " | ".join(p.message for p in plan.problems if p.field == "adapter")

    assert "adapter qlora needs a CUDA GPU and this run has none" in adapter_problems(0, quantization="nf4")
    # on a GPU machine: a 4-bit base is what qlora trains on, so without one the run is refused up front
    # the spec's quantization_methods (bnb-4bit) names the schemes that load such a base
    needs = "adapter qlora needs a base model loaded with quantization nf4 or fp4 or q4_k_m"
    assert f"{needs}, but quantization is none" in adapter_problems(1)
    assert f"{needs}, but quantization is int8" in adapter_problems(1, quantization="int8")
    for four_bit in ("nf4", "q4_k_m"):
        assert "needs a base model loaded with quantization" not in adapter_problems(1, quantization=four_bit)


# -- full fine-tuning and GaLore -------------------------------------------------------


def _parts(model, model_type):
    out = {}
    for name, p in model.named_parameters():
        out.setdefault(part_of(name, model_type), set()).add(p.requires_grad)
    return out


def test_full_trains_projector_and_language_model_by_default(tiny_llava, plugin_manager):
    model = check_adapter(adapter_spec(plugin_manager, "full"), load(tiny_llava), LLAVA, config(adapter="full"))
    assert _parts(model, LLAVA) == {"vision_tower": {False}, "projector": {True}, "language_model": {True}}


@pytest.mark.parametrize(
    "freeze, expected",
    [
        ({"freeze_vision_tower": False, "freeze_language_model": True},
         {"vision_tower": {True}, "projector": {True}, "language_model": {False}}),
        ({"freeze_projector": True}, {"vision_tower": {False}, "projector": {False}, "language_model": {True}}),
    ],
)  # fmt: skip
def test_full_honours_freeze_options(tiny_qwen2_vl, plugin_manager, freeze, expected):
    model = check_adapter(adapter_spec(plugin_manager, "full"), load(tiny_qwen2_vl), QWEN2_VL,
                          config(adapter="full", **freeze))  # fmt: skip
    assert _parts(model, QWEN2_VL) == expected


def test_full_with_everything_frozen_is_an_error(tiny_llava):
    from vistune.adapters.full import apply_full

    cfg = config(adapter="full", freeze_projector=True, freeze_language_model=True)
    with pytest.raises(ConfigError, match="leaves nothing to train"):
        apply_full(load(tiny_llava), LLAVA, cfg)


def test_galore_optimizer_projects_the_language_model_linears(tiny_llava, plugin_manager, tmp_path):
    pytest.importorskip("galore_torch")
    from transformers import Trainer, TrainingArguments

    cfg = config(adapter="galore", galore_rank=4, galore_update_proj_gap=1)
    model = check_adapter(adapter_spec(plugin_manager, "galore"), load(tiny_llava), LLAVA, cfg)
    overrides = trainer_overrides(cfg, LLAVA)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", learning_rate=1e-2, **overrides)
    trainer = Trainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    inner = getattr(optimizer, "optimizer", optimizer)
    galore_group = next(g for g in inner.param_groups if "rank" in g)
    assert galore_group["rank"] == 4
    names = {id(p): n for n, p in model.named_parameters()}
    projected = {names[id(p)] for p in galore_group["params"]}
    assert "model.language_model.layers.0.mlp.down_proj.weight" in projected
    assert "model.multi_modal_projector.linear_1.weight" in projected
    assert "lm_head.weight" not in projected
    assert not any(n.startswith("model.vision_tower.") for n in projected)  # frozen: left out

    # one real step changes the projected weights
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    before = model.model.language_model.layers[0].mlp.down_proj.weight.detach().clone()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    after = model.model.language_model.layers[0].mlp.down_proj.weight.detach()
    assert not torch.equal(before, after)


def test_galore_regex_keeps_a_frozen_nested_projector_out():
    cfg = config(adapter="galore", freeze_vision_tower=False, freeze_projector=True)
    pattern = trainer_overrides(cfg, QWEN2_VL)["optim_target_modules"]
    assert re.fullmatch(pattern, "model.visual.blocks.0.attn.qkv")
    assert not re.fullmatch(pattern, "model.visual.merger.mlp.0")
    assert re.fullmatch(pattern, "model.language_model.layers.0.mlp.up_proj")
    assert not re.fullmatch(pattern, "lm_head")
