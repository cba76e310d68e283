"""The loss on labelled positions only equals the model's own causal LM loss, value and gradients."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from vistune.templates import IGNORE_INDEX  # noqa: E402
from vistune.training.compile import repeated_blocks  # noqa: E402
from vistune.training.lm_loss import causal_lm_loss  # noqa: E402


def _load(path, kind):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForCausalLM if kind == "llama" else AutoModelForImageTextToText
    return auto.from_pretrained(path, dtype=torch.float32).train()


def _batch(model, kind):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(12, 860, (2, 30), generator=gen)
    labels = ids.clone()
    labels[0, :12] = IGNORE_INDEX  # prompt
    labels[1, :20] = IGNORE_INDEX
    labels[1, 27:] = IGNORE_INDEX  # padding
    batch = {"input_ids": ids, "labels": labels, "attention_mask": (labels != -1).long()}
    batch["attention_mask"][1, 27:] = 0
    if kind == "llava":
        n = model.config.image_seq_length
        batch["input_ids"][:, 2 : 2 + n] = model.config.image_token_id
        size = model.config.vision_config.image_size
        batch["pixel_values"] = torch.randn(2, 3, size, size, generator=gen)
    return batch


def _grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


@pytest.mark.parametrize("kind", ["llama", "llava"])
@pytest.mark.parametrize("num_items", [None, 25])
def test_loss_on_labels_only_matches_the_models_loss(kind, num_items, tiny_llama, tiny_llava):
    model = _load(tiny_llama if kind == "llama" else tiny_llava, kind)
    batch = _batch(model, kind)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    want = model(**batch, **extra).loss
    want.backward()
    want_grads = _grads(model)
    got, outputs = causal_lm_loss(model, batch, extra.get("num_items_in_batch"))
    got.backward()
    got_grads = _grads(model)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert outputs.logits.shape[1] < batch["input_ids"].shape[1]  # fewer positions went through lm_head
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_repeated_blocks_are_the_decoder_and_vision_layers(tiny_llava):
    model = _load(tiny_llava, "llava")
    names = sorted(type(m).__name__ for m in repeated_blocks(model))
    assert names.count("LlamaDecoderLayer") == 2
    assert names.count("CLIPEncoderLayer") == 2


@pytest.mark.parametrize("num_items", [None, 25])
def test_trainer_loss_matches_the_transformers_trainer(num_items, tiny_llava, tmp_path):
    from transformers import Trainer
    from vistune.config import RunConfig
    from vistune.training.arguments import training_arguments
    from vistune.training.trainer import VistuneTrainer

    model = _load(tiny_llava, "llava")
    config = RunConfig(task="sft", output_dir=str(tmp_path), report_to=[])
    trainer = VistuneTrainer(model=model, args=training_arguments(config, "cpu", has_eval=False), vistune_config=config)
    batch = _batch(model, "llava")
    count = None if num_items is None else torch.tensor(num_items)
    want = Trainer.compute_loss(trainer, model, batch, num_items_in_batch=count)
    got, outputs = trainer.compute_loss(model, batch, return_outputs=True, num_items_in_batch=count)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert outputs.logits.shape[1] < batch["input_ids"].shape[1]  # the lean path was taken
