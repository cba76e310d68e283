"""``vistune export``: the merged model, loaded with plain transformers, computes what base + adapter computed."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from vistune import hookimpl  # noqa: E402
from vistune.config import build_config  # noqa: E402
from vistune.errors import VistuneError  # noqa: E402
from vistune.models import RUN_FILE  # noqa: E402
from vistune.plan import make_plan  # noqa: E402
from vistune.specs import ModelType  # noqa: E402

MODEL_TYPE = "test-export-llava"


def load_llava(path, options):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32), AutoProcessor.from_pretrained(path)


class ExportModels:
    @hookimpl
    def vistune_register_models(self, register):
        register(ModelType(MODEL_TYPE, loader=load_llava, default_template="test-export",
                           vision_tower=("model.vision_tower",), projector=("model.multi_modal_projector",),
                           language_model=("model.language_model", "lm_head")))  # fmt: skip


@pytest.fixture
def models(register_plugin):
    register_plugin(ExportModels())


def _inputs(model):
    gen = torch.Generator().manual_seed(0)
    size = model.config.vision_config.image_size
    ids = [1, 30, 31] + [model.config.image_token_id] * model.config.image_seq_length + [40, 41, 42, 43]
    return {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(1, 3, size, size, generator=gen)}


def make_adapter(base_dir, adapter_dir, *, use_dora=False, run_file=True):
    """A LoRA adapter with non-zero B (as after training) on q/v of the language model and on the projector."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r"^model\.language_model\..*\.(q_proj|v_proj)$",
                        modules_to_save=["model.multi_modal_projector"], use_dora=use_dora, init_lora_weights=False)  # fmt: skip
    model = get_peft_model(base, config)
    with torch.no_grad():
        model.base_model.model.model.multi_modal_projector.modules_to_save["default"].linear_2.bias.add_(0.5)
    model.eval()
    model.save_pretrained(adapter_dir)
    if run_file:
        run = {"model_type": MODEL_TYPE, "template": "test-export", "adapter": "lora", "base_model": str(base_dir)}
        (adapter_dir / RUN_FILE).write_text(json.dumps(run))
    with torch.no_grad():
        return model(**_inputs(base)).logits


def export(plugin_manager, **values):
    from vistune.pipelines.export import run

    loaded = build_config({"task": "export", "model_type": MODEL_TYPE, **values})
    plan = make_plan(loaded, plugin_manager)
    plan.raise_if_not_ready()
    return run(plan)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merged_model_matches_the_adapter(tiny_llava, tmp_path, models, plugin_manager, use_dora):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    adapter_dir = tmp_path / "run"
    want = make_adapter(tiny_llava, adapter_dir, use_dora=use_dora)
    out = export(plugin_manager, model=str(adapter_dir), export_dir=str(tmp_path / "merged"))
    assert out == tmp_path / "merged"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "run"]  # no staging directory left

    merged, info = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("lora" in name for name, _ in merged.named_parameters())
    merged.eval()
    with torch.no_grad():
        got = merged(**_inputs(merged)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not (out / "adapter_config.json").exists()
    AutoProcessor.from_pretrained(out)  # the processor travels with the weights
    run = json.loads((out / RUN_FILE).read_text())
    assert run["model_type"] == MODEL_TYPE and run["adapter"] is None


def test_llava_export_uses_the_hub_weight_layout(tiny_llava, tmp_path, models, plugin_manager):
    """vLLM (and transformers 4) read CLIP weights under vision_tower.vision_model.*."""
    from safetensors import safe_open

    adapter_dir = tmp_path / "run"
    make_adapter(tiny_llava, adapter_dir)
    out = export(plugin_manager, model=str(adapter_dir), export_dir=str(tmp_path / "merged"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    vision = [k for k in keys if "vision_tower" in k]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys


def test_base_model_and_adapter_path(tiny_llava, tmp_path, models, plugin_manager):
    from transformers import AutoModelForImageTextToText

    adapter_dir = tmp_path / "adapter"
    want = make_adapter(tiny_llava, adapter_dir, run_file=False)
    out = export(plugin_manager, model=str(tiny_llava), adapter_path=str(adapter_dir), output_dir=str(tmp_path / "out"))
    assert out == tmp_path / "out" / "merged"
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**_inputs(merged)).logits, want, atol=1e-5, rtol=1e-5)


def test_refuses_to_overwrite_an_existing_export(tiny_llava, tmp_path, models, plugin_manager):
    adapter_dir = tmp_path / "run"
    make_adapter(tiny_llava, adapter_dir)
    target = tmp_path / "merged"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(VistuneError, match="already exists"):
        export(plugin_manager, model=str(adapter_dir), export_dir=str(target))
    assert (target / "keep.txt").read_text() == "mine"


def test_missing_base_model_is_explained(tmp_path, tiny_llava, models, plugin_manager):
    adapter_dir = tmp_path / "run"
    make_adapter(tiny_llava, adapter_dir)
    run = json.loads((adapter_dir / RUN_FILE).read_text())
    run["base_model"] = str(tmp_path / "gone")
    (adapter_dir / RUN_FILE).write_text(json.dumps(run))
    with pytest.raises(VistuneError, match="not a model directory on this machine") as info:
        export(plugin_manager, model=str(adapter_dir), export_dir=str(tmp_path / "merged"))
    assert "adapter_path" in info.value.hint
