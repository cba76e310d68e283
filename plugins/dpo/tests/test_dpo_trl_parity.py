"""vistune's preference path against TRL's trainers on the same records of a tiny Llava: loss, gradients, metrics.

vistune's side is what ``vistune rl --algorithm ...`` builds: the plan, the records read
from a JSONL file, encoded by vistune's template, collated with the images once per
pair, and the trainer's loss with the vision features shared by both answers.  TRL's
side is TRL's own trainer on a ``datasets.Dataset`` of the same records with their
images opened, its own collator (which processes every image twice) and its own loss.
Both start from the same LoRA weights (vistune's, perturbed so that the policy differs
from its reference) and compute one batch.
"""

from __future__ import annotations

import copy
import math

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from dpo_testing import vistune_trainer, write_jsonl  # noqa: E402

BATCH = 4


def perturb_lora(model, seed=0):
    """Give the LoRA B matrices (zero at initialisation) random values, so the policy differs from its reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def opened(records, directory):
    from PIL import Image

    return [{**record, "images": [Image.open(directory / path).convert("RGB") for path in record["images"]]}
            for record in records]  # fmt: skip


def trl_twin(trainer_cls, config_cls, vistune_model, model_dir, processor, rows, tmp_path, **config):
    """TRL's trainer on a fresh copy of the checkpoint with vistune's LoRA config and weights."""
    from datasets import Dataset
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
    args = config_cls(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=BATCH, bf16=False,
                      gradient_checkpointing=False, report_to=[], max_length=None, use_cpu=True,
                      **config)  # fmt: skip
    peft_config = copy.deepcopy(vistune_model.peft_config["default"])
    trainer = trainer_cls(model=base, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor,
                          peft_config=peft_config)  # fmt: skip
    ours = dict(vistune_model.named_parameters())
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_" in name:
                param.copy_(ours[name])
    return trainer


def lora_grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if "lora_" in name and p.grad is not None}


def step(trainer, batch):
    """One loss and its gradients, as a training step computes them."""
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, trainer._prepare_inputs(batch))
    loss.backward()
    return loss.detach(), lora_grads(model)


def assert_same(ours, theirs, loss_tol=1e-5):
    (loss, grads), (trl_loss, trl_grads) = ours, theirs
    assert loss.item() == pytest.approx(trl_loss.item(), abs=loss_tol)
    assert grads.keys() == trl_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in grads.values())


def dpo_case(options):
    """vistune's algorithm_options and the DPOConfig that computes the same loss in TRL 1.16.

    TRL's ``sigmoid`` loss has no label smoothing; cDPO's ``-(1-e) log s(x) - e log s(-x)`` is
    ``2(1-e) sigmoid - (1-2e) robust`` of TRL's own losses.  RPO is TRL's ``sft`` term added with
    weight ``rpo_alpha``.
    """
    smoothing, alpha = options.get("label_smoothing", 0.0), options.get("rpo_alpha", 0.0)
    losses, weights = ["sigmoid"], [1.0]
    if smoothing:
        losses, weights = ["sigmoid", "robust"], [2 * (1 - smoothing), -(1 - 2 * smoothing)]
    if alpha:
        losses, weights = [*losses, "sft"], [*weights, alpha]
    return {"loss_type": losses, "loss_weights": weights, "label_smoothing": smoothing}


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.2}, {"rpo_alpha": 0.5}], ids=["sigmoid", "cdpo", "rpo"])
def test_dpo_matches_trl(options, llava_eos, shape_pairs, tmp_path):
    directory, records = shape_pairs
    data = write_jsonl(directory / "trl.jsonl", records)
    overrides = ["--algorithm_options", str(options)] if options else []
    trainer, processor = vistune_trainer(llava_eos, data, tmp_path / "out", "dpo", *overrides)
    # under LoRA the reference is the model with its adapter disabled: no second model, no reference adapter
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
    perturb_lora(trainer.model)
    ours = step(trainer, trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)]))

    twin = trl_twin(trl.DPOTrainer, trl.DPOConfig, trainer.model, llava_eos, processor, opened(records, directory),
                    tmp_path, beta=0.1, **dpo_case(options))  # fmt: skip
    theirs = step(twin, twin.data_collator([twin.train_dataset[i] for i in range(BATCH)]))
    assert_same(ours, theirs)
    assert ours[0].item() != pytest.approx(math.log(2), abs=1e-3)  # the policy is not its reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):  # fmt: skip
        assert trainer._logged[f"train:{key}"][-1] == pytest.approx(twin._metrics["train"][key][-1], rel=1e-4, abs=1e-5)


def test_ms_swift_records_give_the_same_batch(llava_eos, shape_pairs, tmp_path):
    """The same pairs written in ms-swift's layout (messages ending with the chosen answer) train identically."""
    directory, records = shape_pairs
    swift = [{"messages": [{"role": "user", "content": "<image>What is in the picture?"},
                           {"role": "assistant", "content": r["chosen"][0]["content"]}],
              "rejected_response": r["rejected"][0]["content"], "images": r["images"]} for r in records]  # fmt: skip
    batches = []
    for name, rows in (("trl.jsonl", records), ("swift.jsonl", swift)):
        trainer, _ = vistune_trainer(llava_eos, write_jsonl(directory / name, rows), tmp_path / name, "dpo")
        batches.append(trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)]))
    assert batches[0].keys() == batches[1].keys()
    for key in batches[0]:
        torch.testing.assert_close(batches[0][key], batches[1][key])


def test_images_go_through_the_vision_tower_once_per_pair(llava_eos, shape_pairs, tmp_path):
    directory, records = shape_pairs
    trainer, _ = vistune_trainer(llava_eos, write_jsonl(directory / "trl.jsonl", records), tmp_path / "out", "dpo")
    perturb_lora(trainer.model)
    seen = []
    tower = trainer.model.get_base_model().model.vision_tower
    handle = tower.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    try:
        step(trainer, trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)]))
    finally:
        handle.remove()
    # policy and reference (adapter disabled) share the features: the vision tower is frozen and has no adapter
    assert seen == [BATCH]


def unpaired(records):
    rows = []
    for record in records:
        for answer, label in ((record["chosen"], True), (record["rejected"], False)):
            rows.append({"prompt": record["prompt"], "completion": answer, "label": label, "images": record["images"]})
    return rows


def test_kto_matches_trl(llava_eos, shape_pairs, tmp_path):
    directory, records = shape_pairs
    rows = unpaired(records)[:BATCH]
    data = write_jsonl(directory / "kto.jsonl", rows)
    trainer, processor = vistune_trainer(llava_eos, data, tmp_path / "out", "kto",
                                         "--algorithm_options", "{desirable_weight: 1.0, undesirable_weight: 1.5}")  # fmt: skip
    perturb_lora(trainer.model)
    ours = step(trainer, trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)]))

    twin = trl_twin(trl.KTOTrainer, trl.KTOConfig, trainer.model, llava_eos, processor, opened(rows, directory),
                    tmp_path, beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)  # fmt: skip
    theirs = step(twin, twin.data_collator([twin.train_dataset[i] for i in range(BATCH)]))
    assert_same(ours, theirs)
    for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert trainer._logged[f"train:{key}"][-1] == pytest.approx(twin._metrics["train"][key][-1], rel=1e-4, abs=1e-5)


def text_pairs(records):
    """The pairs without their images, contents as text parts (the chat template reads parts)."""

    def parts(messages):
        return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]

    return [{"prompt": parts(r["prompt"]), "chosen": parts(r["chosen"]), "rejected": parts(r["rejected"])}
            for r in records]  # fmt: skip


@pytest.mark.parametrize("algorithm", ["orpo", "simpo"])
def test_orpo_and_simpo_match_trl(algorithm, llava_eos, shape_pairs, tmp_path):
    """Against ``trl.experimental``'s ORPOTrainer and CPOTrainer (loss_type simpo), which take text records only."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    directory, records = shape_pairs
    rows = text_pairs(records)
    options = ["--beta", "0.5"] if algorithm == "orpo" else ["--algorithm_options", "{gamma: 0.8}"]
    trainer, processor = vistune_trainer(llava_eos, write_jsonl(tmp_path / "text.jsonl", rows), tmp_path / "out",
                                         algorithm, *options)  # fmt: skip
    perturb_lora(trainer.model)
    ours = step(trainer, trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)]))

    tokenizer = processor.tokenizer
    tokenizer.chat_template = processor.chat_template
    if algorithm == "orpo":
        twin = trl_twin(ORPOTrainer, ORPOConfig, trainer.model, llava_eos, tokenizer, rows, tmp_path, beta=0.5)
    else:
        twin = trl_twin(CPOTrainer, CPOConfig, trainer.model, llava_eos, tokenizer, rows, tmp_path, beta=2.0,
                        loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.8)  # fmt: skip
    twin.model.train()
    twin.model.zero_grad()
    batch = twin._prepare_inputs(twin.data_collator([twin.train_dataset[i] for i in range(BATCH)]))
    trl_loss, trl_metrics = twin.get_batch_loss_metrics(twin.model, batch)
    if algorithm == "orpo":
        # TRL's ORPO takes its NLL over prompt and answer; vistune's over the answer, as SFT (a VLM prompt is mostly
        # image placeholders).  TRL's odds-ratio term, plus the NLL of the answer tokens TRL labels:
        chosen_logps, rejected_logps, chosen_logits = twin.concatenated_forward(twin.model, batch)[:3]
        odds_ratio_term = twin.odds_ratio_loss(chosen_logps, rejected_logps)[0].mean()
        labels = batch["chosen_labels"][:, 1:]
        answer_nll = torch.nn.functional.cross_entropy(chosen_logits.reshape(-1, chosen_logits.shape[-1]),
                                                       labels.reshape(-1), ignore_index=-100)  # fmt: skip
        trl_loss = answer_nll - odds_ratio_term
    trl_loss.backward()
    assert_same(ours, (trl_loss.detach(), lora_grads(twin.model)))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert trainer._logged[f"train:{key}"][-1] == pytest.approx(trl_metrics[key], rel=1e-4, abs=1e-5)


def test_dpo_full_fine_tuning_matches_trl(llava_eos, shape_pairs, tmp_path):
    """Full fine-tuning: vistune's reference is a frozen copy made at load, TRL's a second load of the checkpoint."""
    from datasets import Dataset
    from transformers import LlavaForConditionalGeneration

    directory, records = shape_pairs
    trainer, processor = vistune_trainer(llava_eos, write_jsonl(directory / "trl.jsonl", records), tmp_path / "out",
                                         "dpo", "--adapter", "full")  # fmt: skip
    assert trainer.ref_model is not None

    def perturb(model):  # the policy moves away from its reference: the language model's MLPs
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "language_model" in name and ".mlp." in name:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.5)

    def grads(model):
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "language_model" in n and p.grad is not None}

    perturb(trainer.model)
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)]))
    loss.backward()
    ours = (loss.detach(), grads(model))

    base = LlavaForConditionalGeneration.from_pretrained(str(llava_eos), dtype=torch.float32)
    perturb(base)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=BATCH, bf16=False,
                         gradient_checkpointing=False, report_to=[], max_length=None, use_cpu=True, beta=0.1)  # fmt: skip
    twin = trl.DPOTrainer(model=base, args=args, train_dataset=Dataset.from_list(opened(records, directory)),
                          processing_class=processor)  # fmt: skip
    twin.model.train()
    twin.model.zero_grad()
    trl_loss = twin.compute_loss(twin.model, twin._prepare_inputs(twin.data_collator([twin.train_dataset[i] for i in range(BATCH)])))
    trl_loss.backward()
    theirs = (trl_loss.detach(), grads(twin.model))
    assert ours[0].item() != pytest.approx(math.log(2), abs=1e-3)
    assert ours[0].item() == pytest.approx(theirs[0].item(), abs=1e-5)
    assert ours[1].keys() == theirs[1].keys()
    for name, grad in ours[1].items():
        torch.testing.assert_close(grad, theirs[1][name], rtol=1e-4, atol=1e-6, msg=name)
