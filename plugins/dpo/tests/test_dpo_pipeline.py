"""``vistune rl --algorithm dpo|kto ...`` end to end on the tiny Llava: plan, outputs, logs, reference options."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dpo_testing import vistune_trainer, write_jsonl

torch = pytest.importorskip("torch")


def vistune(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "vistune", *args], capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"vistune {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_dry_run_needs_no_rewards_or_backend(llava_eos, shape_pairs, tmp_path):
    directory, records = shape_pairs
    data = write_jsonl(directory / "trl.jsonl", records)
    result = vistune("rl", "--model", str(llava_eos), "--dataset", str(data), "--algorithm", "dpo", "--output_dir",
                     str(tmp_path / "out"), "--dataloader_num_workers", "1", "--cache_encoded", "true",
                     "--dry-run")  # fmt: skip
    fields = [line.split()[0] for line in result.stdout.splitlines()[1:] if line.startswith("  ")]
    assert "dpo  [vistune-dpo]" in result.stdout and result.stdout.rstrip().endswith("ready")
    assert "rewards" not in fields and "backend" not in fields
    # the pipeline starts DataLoader workers as sft does; it never caches encodings
    assert "cache_encoded (command line --cache_encoded) is not used by `vistune rl`" in result.stdout
    assert "dataloader_num_workers (" not in result.stdout, result.stdout


def test_dpo_run_writes_an_adapter_and_preference_metrics(llava_eos, shape_pairs, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    directory, records = shape_pairs
    data = write_jsonl(directory / "trl.jsonl", records)
    output = tmp_path / "out"
    run = vistune("rl", "--model", str(llava_eos), "--dataset", str(data), "--eval_dataset", str(data), "--algorithm",
                  "dpo", "--device", "cpu", "--dtype", "float32", "--max_steps", "2", "--per_device_batch_size", "2",
                  "--save_steps", "2", "--dataloader_num_workers", "1", "--output_dir", str(output))  # fmt: skip
    assert "vistune: training data: 4 pairs; 0 dropped (longer than max_length), 0 bad records skipped" in run.stdout
    logged = metrics(output)
    steps = [r for r in logged if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):  # fmt: skip
        assert all(isinstance(r[key], float) for r in steps), key
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # the policy starts as its reference
    evaluations = [r for r in logged if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 2] and "eval_rewards/accuracies" in evaluations[-1]
    base = LlavaForConditionalGeneration.from_pretrained(str(llava_eos), dtype=torch.float32)
    PeftModel.from_pretrained(base, str(output))  # a plain peft adapter on the checkpoint
    assert json.loads((output / "vistune_run.json").read_text())["config"]["algorithm"] == "dpo"


@pytest.mark.parametrize(("algorithm", "summary"), [
    ("dpo", "6 pairs; 1 dropped (longer than max_length), 1 bad records skipped"),
    ("kto", "12 answers; 1 dropped (longer than max_length), 2 bad answers skipped"),  # a pair: two answers
])  # fmt: skip
def test_pairs_dropped_for_length_or_skipped_are_counted_across_loader_workers(algorithm, summary, llava_eos,
                                                                               shape_pairs, tmp_path):  # fmt: skip
    from torch.utils.data import DataLoader

    directory, records = shape_pairs
    too_long = records[0] | {"chosen": [{"role": "assistant", "content": "a red circle " * 300}]}
    no_image = records[1] | {"images": ["images/missing.png"]}
    data = write_jsonl(directory / f"dropped-{algorithm}.jsonl", [too_long, no_image, *records])
    trainer, _ = vistune_trainer(llava_eos, data, tmp_path / "out", algorithm, "--max_length", "256", "--truncation",
                                 "drop", "--on_bad_record", "skip")  # fmt: skip
    items = trainer.train_dataset
    # every index read once, in two worker processes: what they met reaches this process's counts
    loader = DataLoader(items, batch_size=1, num_workers=2, collate_fn=lambda batch: batch[0]["index"])
    indices = list(loader)
    assert items.summary() == summary
    replaced = {0, 1} if algorithm == "dpo" else {0, 2, 3}  # kto: the long chosen answer, both answers of the bad pair
    assert not replaced & set(indices) and len(indices) == len(items)


def test_bad_algorithm_options_stop_the_run_before_the_model_loads(llava_eos, shape_pairs, tmp_path):
    directory, records = shape_pairs
    data = write_jsonl(directory / "trl.jsonl", records)
    result = vistune("rl", "--model", str(llava_eos), "--dataset", str(data), "--algorithm", "dpo", "--output_dir",
                     str(tmp_path / "out"), "--dpo.label_smoothing", "0.5", check=False)  # fmt: skip
    assert result.returncode == 2
    assert "dpo.label_smoothing of algorithm 'dpo' must be in [0, 0.5), got 0.5" in result.stderr
    assert "Loading weights" not in result.stderr


def test_precomputed_reference_equals_the_adapter_disabled_model(llava_eos, shape_pairs, tmp_path):
    from test_dpo_trl_parity import perturb_lora

    directory, records = shape_pairs
    data = write_jsonl(directory / "trl.jsonl", records)
    trainer, _ = vistune_trainer(llava_eos, data, tmp_path / "out", "dpo", "--algorithm_options",
                                 "{precompute_ref_log_probs: true}")  # fmt: skip
    table = trainer.precomputed["train"]
    assert table.shape == (len(records), 2)
    perturb_lora(trainer.model)  # training moves the policy; the reference must stay the starting model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(records))])
    with torch.no_grad(), trainer.reference() as reference:
        live = trainer._paired_logps(reference, batch)
    chosen, rejected = live.halves()
    torch.testing.assert_close(table[batch["index"]], torch.stack([chosen.sums, rejected.sums], dim=1), rtol=1e-5,
                               atol=1e-4)  # fmt: skip


@pytest.mark.slow
def test_dpo_raises_held_out_preference_accuracy_on_shapes(tiny_llava, tmp_path):
    """The embedded default: DPO on ``shapes-preferences`` (full fine-tuning, CPU) ranks held-out right captions first."""
    output = tmp_path / "out"
    vistune("rl", "--model", str(tiny_llava), "--dataset", "shapes-preferences", "--eval_dataset",
            "shapes-preferences-eval", "--algorithm", "dpo", "--adapter", "full", "--learning_rate", "5e-4",
            "--device", "cpu", "--dtype", "float32", "--max_steps", "60", "--per_device_batch_size", "8",
            "--save_steps", "60", "--max_length", "128", "--seed", "0", "--output_dir", str(output))  # fmt: skip
    start, end = [r for r in metrics(output) if "eval_loss" in r]
    assert end["eval_loss"] < start["eval_loss"] - 0.02
    assert end["eval_logps/accuracies"] >= start["eval_logps/accuracies"] + 0.1
    assert end["eval_rewards/accuracies"] >= 0.65


@pytest.mark.slow
def test_two_processes_log_the_same_preference_metrics(llava_eos, shape_pairs, tmp_path):
    """DDP on two CPU processes: each logs the metrics averaged over both, so the rank files agree."""
    directory, records = shape_pairs
    data = write_jsonl(directory / "trl.jsonl", records)
    output = tmp_path / "out"
    vistune("rl", "--model", str(llava_eos), "--dataset", str(data), "--algorithm", "dpo", "--device", "cpu",
            "--dtype", "float32", "--max_steps", "2", "--per_device_batch_size", "1", "--save_steps", "2",
            "--gpu_num", "2", "--parallel_method", "ddp", "--output_dir", str(output))  # fmt: skip
    main = [r for r in metrics(output) if "loss" in r]
    other = [json.loads(line) for line in (output / "metrics.rank1.jsonl").read_text().splitlines()]
    other = [r for r in other if "loss" in r]
    assert len(main) == len(other) == 2
    for ours, theirs in zip(main, other):
        for key in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
def test_dpo_on_an_sft_adapter_starts_from_it(llava_eos, shape_pairs, tmp_path):
    """DPO after ``vistune sft``: the policy trains that adapter on, the reference is a frozen copy of it."""
    directory, records = shape_pairs
    data = write_jsonl(directory / "trl.jsonl", records)
    sft = tmp_path / "sft"
    vistune("sft", "--model", str(llava_eos), "--dataset", "shapes-captions", "--max_samples", "8", "--max_steps", "3",
            "--per_device_batch_size", "2", "--learning_rate", "1e-2", "--device", "cpu", "--dtype", "float32",
            "--max_length", "128", "--output_dir", str(sft))  # fmt: skip
    output = tmp_path / "dpo"
    result = vistune("rl", "--model", str(sft), "--dataset", str(data), "--algorithm", "dpo", "--device", "cpu",
                     "--dtype", "float32", "--max_steps", "1", "--per_device_batch_size", "2", "--output_dir",
                     str(output))  # fmt: skip
    assert "reference: adapter reference" in result.stdout
    first = next(r for r in metrics(output) if "loss" in r)
    assert first["loss"] == pytest.approx(0.6931, abs=1e-4)  # the policy is the SFT adapter, and so is its reference
    assert first["logps/chosen"] != 0
    saved = json.loads((output / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and not (output / "reference").exists()
