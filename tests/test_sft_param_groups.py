"""Separate learning rates for the vision tower, projector and language model."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from vistune.config import build_config
from vistune.specs import ModelType
from vistune.adapters.targets import part_of

LLAVA = ModelType(
    "sft-test-llava", loader="transformers:AutoModelForImageTextToText", default_template="sft-test",
    vision_tower=("model.vision_tower",), projector=("model.multi_modal_projector",),
    language_model=("model.language_model", "lm_head"),
)  # fmt: skip


def _trainer(model, tmp_path, **values):
    from vistune.training.arguments import training_arguments
    from vistune.training.trainer import VistuneTrainer

    config = build_config(
        {"task": "sft", "output_dir": str(tmp_path), "lr_scheduler_type": "constant", **values}
    ).config
    args = training_arguments(config, "cpu", has_eval=False)
    return VistuneTrainer(model=model, args=args, vistune_config=config, model_type=LLAVA)


def _load(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)


def test_wrapper_prefixes_are_stripped():
    assert part_of("module.base_model.model.model.vision_tower.x", LLAVA) == "vision_tower"
    assert part_of("_orig_mod.model.multi_modal_projector.linear_1.weight", LLAVA) == "projector"
    assert part_of("model.vision_tower.x", None) == "language_model"  # no model type: one part
    assert (
        part_of("base_model.model.model.multi_modal_projector.modules_to_save.default.linear_1.weight", LLAVA)
        == "projector"
    )
    assert part_of("base_model.model.lm_head.weight", LLAVA) == "language_model"
    assert part_of("model.vision_tower.embeddings.patch_embedding.weight", LLAVA) == "vision_tower"


def test_each_part_gets_its_learning_rate(tiny_llava, tmp_path):
    model = _load(tiny_llava)
    trainer = _trainer(model, tmp_path, learning_rate=1e-4, vision_tower_lr=1e-3, projector_lr=5e-4, weight_decay=0.1)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    groups = trainer.optimizer.param_groups
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    # every trainable parameter is in exactly one group
    assert sum(len(g["params"]) for g in groups) == len(names) == len(by_param)
    for name, param in names.items():
        group = by_param[id(param)]
        expected = 1e-3 if name.startswith("model.vision_tower.") else 5e-4 if "multi_modal_projector" in name else 1e-4
        assert group["lr"] == pytest.approx(expected), name
        decays = name in trainer.get_decay_parameter_names(model)
        assert group["weight_decay"] == (0.1 if decays else 0.0), name
    # the scheduler keeps the ratio between parts
    assert sorted(trainer.lr_scheduler.get_last_lr()) == sorted(g["lr"] for g in groups)
    # the language model's group comes first: its rate is the one the Trainer logs
    assert groups[0]["lr"] == pytest.approx(1e-4)


def test_same_rates_leave_the_trainers_own_optimizer(tiny_llava, tmp_path):
    trainer = _trainer(_load(tiny_llava), tmp_path, learning_rate=2e-4)
    trainer.create_optimizer()
    assert {g["lr"] for g in trainer.optimizer.param_groups} == {2e-4}
    assert all("name" not in g for g in trainer.optimizer.param_groups)


def test_peft_wrapped_parts_are_recognised(tiny_llava, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                             modules_to_save=["model.multi_modal_projector"])  # fmt: skip
    model = get_peft_model(_load(tiny_llava), peft_config)
    trainer = _trainer(model, tmp_path, learning_rate=1e-4, projector_lr=3e-3)
    trainer.create_optimizer()
    lrs = {}
    for group in trainer.optimizer.param_groups:
        for param in group["params"]:
            lrs[id(param)] = group["lr"]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n, _ in trainable) and any("modules_to_save" in n for n, _ in trainable)
    assert len(lrs) == len(trainable)
    for name, param in trainable:
        assert lrs[id(param)] == pytest.approx(3e-3 if "multi_modal_projector" in name else 1e-4), name
