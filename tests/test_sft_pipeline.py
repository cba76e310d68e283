"""``vistune sft`` end to end on the tiny Llava: outputs, hooks, metrics, refusals, resume, two processes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from vistune import hookimpl
from vistune.cli import main
from vistune.demo.shapes import write_split
from vistune.models import RUN_FILE
from vistune.training import checkpoints
from vistune.training.metrics import read_metrics


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A small local copy of the shapes captions: 32 training and 8 held-out records."""
    root = tmp_path_factory.mktemp("shapes")
    return write_split(root, "train", count=32), write_split(root, "eval", count=8)


@pytest.fixture
def llava_plugin(plugin_manager):
    if "llava" not in plugin_manager.registries.models:
        pytest.skip("the llava plugin is not installed (pip install -e plugins/llava)")


def _config(path: Path, **values) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def _base(model, shapes, output_dir, **values):
    train, held_out = shapes
    base = {"model": str(model), "dataset": str(train), "eval_dataset": str(held_out), "output_dir": str(output_dir),
            "dtype": "float32", "device": "cpu", "per_device_batch_size": 4, "logging_steps": 1, "seed": 0}  # fmt: skip
    return {**base, **values}


def test_lora_run_writes_a_loadable_adapter_metrics_and_fires_hooks(tiny_llava, shapes, tmp_path, register_plugin,
                                                                     llava_plugin, capsys):  # fmt: skip
    seen = {"trainers": [], "saved": []}

    class Listener:
        @hookimpl
        def vistune_trainer_created(self, trainer, config):
            seen["trainers"].append(type(trainer).__name__)

        @hookimpl
        def vistune_checkpoint_saved(self, path, step, config):
            seen["saved"].append((Path(path).name, step, (Path(path) / checkpoints.COMPLETE_MARKER).exists()))

    register_plugin(Listener())
    out = tmp_path / "out"
    config = _config(tmp_path / "run.yaml", **_base(tiny_llava, shapes, out, adapter="lora", lora_dropout=0.0,
                     max_steps=4, save_steps=2, learning_rate=1e-2, projector_lr=1e-3))  # fmt: skip
    assert main(["sft", "--config", str(config)]) == 0
    captured = capsys.readouterr()
    assert "training data: 32 samples; 0 dropped (longer than max_length), 0 bad records skipped" in captured.out
    # the progress bar shows the step's loss, learning rate and tokens/s
    assert re.search(r"train: 100%.*4/4 .*loss=\d+\.\d{4}, lr=\d\.\d\de-\d\d, tok/s=\d+", captured.err)

    assert seen["trainers"] == ["VistuneTrainer"]
    assert seen["saved"] == [("checkpoint-2", 2, True), ("checkpoint-4", 4, True), ("out", 4, False)]
    run = json.loads((out / RUN_FILE).read_text())
    assert (run["model_type"], run["template"], run["adapter"]) == ("llava", "llava-1.5", "lora")
    assert Path(run["base_model"]) == Path(tiny_llava).resolve() and run["config"]["max_steps"] == 4

    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for record in steps:
        assert {"epoch", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(record)
        assert record["tokens"] > 0 and record["loss"] > 0
    assert any("eval_loss" in r for r in records)
    assert (out / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    # the adapter loads with plain transformers + peft, and it was trained
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base = AutoModelForImageTextToText.from_pretrained(tiny_llava, dtype=torch.float32)
    before = {n: p.clone() for n, p in base.named_parameters() if "multi_modal_projector" in n}
    model = PeftModel.from_pretrained(base, out)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # peft initialises B to zero
    assert all("language_model" in n for n, _ in model.named_parameters() if "lora_" in n)
    AutoProcessor.from_pretrained(out)
    # the projector was not trained (LoRA without freeze_projector: false)
    merged = model.merge_and_unload()
    for name, param in merged.named_parameters():
        if name in before:
            assert torch.equal(param, before[name])


def test_full_run_trains_every_unfrozen_part(tiny_llava, shapes, tmp_path, llava_plugin):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "out"
    config = _config(tmp_path / "run.yaml", **_base(tiny_llava, shapes, out, adapter="full", max_steps=2,
                     save_steps=10, learning_rate=1e-3, report_to=["jsonl"]))  # fmt: skip
    assert main(["sft", "--config", str(config)]) == 0
    base = dict(AutoModelForImageTextToText.from_pretrained(tiny_llava, dtype=torch.float32).named_parameters())
    trained = dict(AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).named_parameters())
    changed = {n for n in base if not torch.equal(base[n], trained[n])}
    assert any(n.startswith("model.multi_modal_projector") for n in changed)
    assert any(n.startswith("model.language_model") for n in changed)
    assert not any(n.startswith("model.vision_tower") for n in changed)  # freeze_vision_tower defaults to true


def test_refuses_an_output_dir_with_checkpoints_before_loading(tiny_llava, shapes, tmp_path, monkeypatch, capsys,
                                                                llava_plugin):  # fmt: skip
    import vistune.loading

    out = tmp_path / "out"
    existing = out / "checkpoint-3"
    existing.mkdir(parents=True)
    (existing / checkpoints.COMPLETE_MARKER).write_text("")

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(vistune.loading, "load_model", must_not_load)
    config = _config(tmp_path / "run.yaml", **_base(tiny_llava, shapes, out, max_steps=2))
    assert main(["sft", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints (checkpoint-3)" in err and "resume: auto" in err
    assert existing.is_dir()


KILLER = """
import os, signal, sys
from vistune import hookimpl
from vistune.cli import main
from vistune.plugins import get_plugin_manager

class Killer:
    @hookimpl
    def vistune_checkpoint_saved(self, path, step, config):
        if step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

get_plugin_manager().add_plugin(Killer(), name="killer")
sys.exit(main(["sft", "--config", {config!r}]))
"""


def _weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tiny_llava, shapes, tmp_path, llava_plugin):
    # 32 samples / batch 4 = 8 steps per epoch: the run crosses an epoch boundary after the crash
    values = _base(tiny_llava, shapes, None, adapter="full", freeze_vision_tower=False, max_steps=10, save_steps=3,
                   learning_rate=1e-3, report_to=["jsonl"])  # fmt: skip
    values.pop("eval_dataset")
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert main(["sft", "--config", str(_config(tmp_path / "a.yaml", **{**values, "output_dir": str(straight)}))]) == 0

    config = _config(tmp_path / "b.yaml", **{**values, "output_dir": str(crashed)})
    script = textwrap.dedent(KILLER).format(kill_at=6, config=str(config))
    # the same thread count as this process: CPU reductions split by thread count round differently
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == -9, result.stderr[-3000:]
    assert checkpoints.latest_checkpoint(crashed) == crashed / "checkpoint-6"
    assert not (crashed / RUN_FILE).exists()

    assert main(["sft", "--config", str(config), "--resume", "auto"]) == 0
    expected, got = _weights(straight), _weights(crashed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], rtol=0, atol=1e-7), name
    # the metrics of the resumed run continue the crashed one's, without the steps trained twice
    losses = {r["step"]: r["loss"] for r in read_metrics(straight / "metrics.jsonl") if "loss" in r}
    resumed = [(r["step"], r["loss"]) for r in read_metrics(crashed / "metrics.jsonl") if "loss" in r]
    assert [s for s, _ in resumed] == list(range(1, 11))
    assert all(loss == pytest.approx(losses[step], rel=1e-5) for step, loss in resumed)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_on_cpu_share_the_work(tiny_llava, shapes, tmp_path, llava_plugin):
    out = tmp_path / "out"
    values = _base(tiny_llava, shapes, out, adapter="lora", lora_dropout=0.0, max_steps=4, save_steps=2,
                   per_device_batch_size=2, gpu_num=2, parallel_method="ddp", master_port=_free_port(),
                   report_to=["jsonl"])  # fmt: skip
    values.pop("eval_dataset")
    config = _config(tmp_path / "run.yaml", **values)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "vistune", "sft", "--config", str(config)], env=env,
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.distributed.run --nproc_per_node 2" in result.stderr
    main_records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    other_records = [r for r in read_metrics(out / "metrics.rank1.jsonl") if "loss" in r]
    assert [r["step"] for r in main_records] == [r["step"] for r in other_records] == [1, 2, 3, 4]
    for a, b in zip(main_records, other_records):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)  # averaged over both processes
        # two processes x 2 samples per step out of 32: each step is 1/8 of an epoch
        assert a["epoch"] == pytest.approx(a["step"] * 2 * 2 / 32)
    final = out / "checkpoint-4"
    assert checkpoints.is_complete(final)
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in final.iterdir()}
    assert (out / RUN_FILE).is_file()
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_llava), out)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_multi_node_is_the_same_torchrun_with_rendezvous_flags(tmp_path, plugin_manager):
    from vistune.config import load_config
    from vistune.launch import torchrun_command, worker_config
    from vistune.plan import make_plan

    config = _config(tmp_path / "run.yaml", model="nowhere", device="cpu", parallel_method="ddp", gpu_num=2, nnodes=2,
                     node_rank=1, master_addr="10.0.0.1", master_port=29555)  # fmt: skip
    loaded = load_config(str(config), task="sft")
    plan = make_plan(loaded, plugin_manager)
    assert plan.launch.distributed and plan.launch.processes_per_node == 2
    command = torchrun_command(plan, tmp_path / "launch.yaml")
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert dict(zip(command[3:13:2], command[4:13:2])) == {
        "--nproc_per_node": "2", "--nnodes": "2", "--node_rank": "1", "--master_addr": "10.0.0.1",
        "--master_port": "29555"}  # fmt: skip
    assert command[13:] == ["-m", "vistune.cli", "sft", "--config", str(tmp_path / "launch.yaml")]
    # the workers read back this node's values
    assert {k: worker_config(loaded)[k] for k in ("nnodes", "node_rank", "master_addr")} == {
        "nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.1"}  # fmt: skip


def test_fsdp_with_cpu_processes_is_refused_before_starting_them(tiny_llava, shapes, tmp_path, monkeypatch, capsys,
                                                                 llava_plugin):  # fmt: skip
    """accelerate shards only across GPUs: CPU processes asked for fsdp would quietly train as DDP."""
    import vistune.launch

    monkeypatch.setattr(vistune.launch, "relaunch_if_needed", lambda plan: pytest.fail("started before the check"))
    config = _config(tmp_path / "run.yaml", **_base(tiny_llava, shapes, tmp_path / "out", gpu_num=2,
                                                    parallel_method="fsdp"))  # fmt: skip
    assert main(["sft", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "parallel_method: parallel_method fsdp shards the model across GPUs" in err
    assert "set parallel_method: ddp for CPU processes" in err


def _train(tmp_path, name, model, shapes, **values):
    """Build the pipeline's trainer for a short LoRA run and train it."""
    from vistune.config import load_config
    from vistune.pipelines.sft import build_trainer
    from vistune.plan import make_plan
    from vistune.plugins import get_plugin_manager

    values = _base(model, shapes, tmp_path / name, adapter="lora", lora_dropout=0.0, max_steps=2, save_steps=10,
                   learning_rate=1e-2, report_to=["jsonl"], **values)  # fmt: skip
    values.pop("eval_dataset")
    plan = make_plan(load_config(str(_config(tmp_path / f"{name}.yaml", **values)), task="sft"), get_plugin_manager())
    plan.raise_if_not_ready()
    trainer, _ = build_trainer(plan)
    trainer.train()
    return trainer


def test_gradient_checkpointing_and_bf16_switches(tiny_llava, shapes, tmp_path, llava_plugin):
    def lora_weights(trainer):
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}

    def checkpointing(trainer):
        return {getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules()
                if type(m).__name__ == "LlamaDecoderLayer"}  # fmt: skip

    def losses(trainer):
        return [r["loss"] for r in read_metrics(Path(trainer.args.output_dir) / "metrics.jsonl") if "loss" in r]

    plain = _train(tmp_path, "plain", tiny_llava, shapes)
    recomputed = _train(tmp_path, "checkpointed", tiny_llava, shapes, gradient_checkpointing=True)
    assert checkpointing(plain) == {False} and checkpointing(recomputed) == {True}
    # recomputing activations changes nothing: LoRA under a frozen embedding still gets its gradients
    want, got = lora_weights(plain), lora_weights(recomputed)
    assert any(p.abs().sum() > 0 for n, p in want.items() if "lora_B" in n)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)

    half = _train(tmp_path, "bf16", tiny_llava, shapes, bf16=True)
    assert half.accelerator.mixed_precision == "bf16"
    # the steps ran under bfloat16 autocast: close to the float32 losses, but not the same numbers
    assert losses(half) == pytest.approx(losses(plain), rel=2e-2) and losses(half) != losses(plain)


def test_warmup_ratio_is_a_fraction_of_the_steps(tmp_path):
    from vistune.config import build_config
    from vistune.errors import ConfigError
    from vistune.training.arguments import training_arguments

    def arguments(ratio):
        config = build_config({"task": "sft", "output_dir": str(tmp_path), "warmup_ratio": ratio}).config
        return training_arguments(config, "cpu", has_eval=False)

    assert arguments(0.25).get_warmup_steps(40) == 10  # the scheduler's own reading of the argument
    # transformers would read 1.0 as one step: the config refuses it rather than warm up for 1 step of 40
    with pytest.raises(ConfigError, match="warmup_ratio must be below 1"):
        arguments(1.0)


def test_liger_without_the_package_is_refused_before_loading(tiny_llava, shapes, tmp_path, monkeypatch, capsys,
                                                             llava_plugin):  # fmt: skip
    import importlib.util

    import vistune.loading

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    monkeypatch.setattr(vistune.loading, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    config = _config(tmp_path / "run.yaml", **_base(tiny_llava, shapes, tmp_path / "out", liger=True))
    assert main(["sft", "--config", str(config)]) == 2
    assert "liger-kernel package is not installed" in capsys.readouterr().err


def test_packed_batches_keep_every_image_of_their_rows(tiny_llava, shapes, tmp_path, monkeypatch, llava_plugin):
    import transformers.trainer
    from vistune.config import load_config
    from vistune.pipelines.sft import build_trainer
    from vistune.plan import make_plan
    from vistune.plugins import get_plugin_manager

    values = _base(tiny_llava, shapes, tmp_path / "out", packing=True, max_packed_length=128, max_steps=2,
                   per_device_batch_size=2, report_to=["jsonl"])  # fmt: skip
    plan = make_plan(load_config(str(_config(tmp_path / "run.yaml", **values)), task="sft"), get_plugin_manager())
    plan.raise_if_not_ready()
    trainer, _ = build_trainer(plan)
    batch = next(iter(trainer.get_train_dataloader()))
    image_token = trainer.model.config.image_token_id
    images = batch["pixel_values"].shape[0]
    assert images > batch["input_ids"].shape[0]  # several samples per row
    assert (batch["input_ids"] == image_token).sum().item() == images * 16  # 16 tokens per tiny-Llava image
    warned = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", lambda msg, *a, **k: warned.append(str(msg)))
    trainer.train()
    records = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert len(records) == 2 and all(0 < r["loss"] < 20 for r in records)
    # packed rows have no attention mask to count tokens by: every token counts, without a warning per step
    assert records[0]["tokens"] > 0 and not [w for w in warned if "non-padding tokens" in w]
