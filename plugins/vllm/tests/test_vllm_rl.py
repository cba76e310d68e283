"""RL rollouts through vLLM: the engine samples from the policy being trained, as transformers would.

Skipped where vllm is not installed.  vLLM keeps its own copy of the weights; after
``update_weights`` its greedy completions must equal the changed policy's own, token for
token, for a LoRA policy (synced as a vLLM LoRA adapter) and for a fully trained one
(synced by reloading merged weights).
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

from vistune.config import RunConfig
from vistune.inference import GenerationRequest, SamplingParams
from vistune.templates import Sample, TemplateOptions

PROMPTS = ["a red circle", "There is a blue square next to a green star on the left."]
CONFIG = RunConfig(task="rl", device="cpu", dtype="float32", max_length=256)


@pytest.fixture(autouse=True)
def small_kv_cache(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))


def chat(text: str) -> Sample:
    return Sample([{"role": "user", "content": text}])


def load_policy(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vistune.plugins import get_plugin_manager
    from vistune.specs import load_ref

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    template = get_plugin_manager().registries.templates.get("chat-template")
    encoder = load_ref(template.factory)(tokenizer, TemplateOptions(max_length=256))
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), tokenizer, encoder


def greedy(model, encoder, prompt: Sample, max_new_tokens: int = 16) -> list[int]:
    ids = encoder.encode_prompt(prompt)["input_ids"]
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    out = out[0, len(ids) :].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    return out[: next((i + 1 for i, t in enumerate(out) if t in eos), len(out))]


def sampled(engine, adapter, max_new_tokens: int = 16) -> list[list[int]]:
    requests = [GenerationRequest(chat(p), SamplingParams(max_tokens=max_new_tokens), adapter=adapter) for p in PROMPTS]
    return [result.outputs[0].token_ids for result in engine.generate(requests)]


def check_follows(engine, model, encoder, adapter):
    model.eval()
    expected = [greedy(model, encoder, chat(p)) for p in PROMPTS]
    assert sampled(engine, adapter) == expected
    return expected


def test_lora_policy_is_synced_as_an_adapter(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from vistune_vllm.engine import VllmEngine

    base, tokenizer, encoder = load_policy(tiny_llama)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))  # fmt: skip
    engine = VllmEngine.from_model(model, tokenizer, encoder, max_batch_size=4, config=CONFIG)
    try:
        before = check_follows(engine, model, encoder, "default")
        with torch.no_grad():  # a training step's worth of change
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(-4.0)
        engine.update_weights(model)
        after = check_follows(engine, model, encoder, "default")
        assert after != before  # the update changed what the policy samples
        assert len(os.listdir(engine._weights_dir.name)) == 1  # earlier versions are deleted
    finally:
        engine.close()


def test_fully_trained_policy_is_synced_by_reloading_weights(tiny_llama):
    from vistune_vllm.engine import VllmEngine

    model, tokenizer, encoder = load_policy(tiny_llama)
    engine = VllmEngine.from_model(model, tokenizer, encoder, max_batch_size=4, config=CONFIG)
    try:
        before = check_follows(engine, model, encoder, None)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "mlp" in name:
                    param.add_(torch.randn(param.shape, generator=generator) * param.std())
        engine.update_weights(model)
        after = check_follows(engine, model, encoder, None)
        assert after != before
    finally:
        engine.close()


def test_rl_run_samples_through_vllm(tmp_path, tiny_llama, register_plugin):
    import yaml
    from vistune import hookimpl
    from vistune.cli import main
    from vistune.training.metrics import read_metrics
    from vistune_vllm.engine import VllmEngine

    engines = []

    class Recorder:
        @hookimpl
        def vistune_rollout_scored(self, prompts, completions, rewards, step):
            engines.append(type(trainers[0]._engine))

        @hookimpl
        def vistune_trainer_created(self, trainer, config):
            trainers.append(trainer)

    trainers = []
    register_plugin(Recorder())
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"messages": [{{"role": "user", "content": "{p}"}}]}}\n' for p in PROMPTS))
    (tmp_path / "rewards.py").write_text(
        "def length(prompts, completions, **columns):\n    return [float(len(c.split())) for c in completions]\n"
    )
    config = {
        "task": "rl", "model": str(tiny_llama), "dataset": str(data), "backend": "vllm", "device": "cpu",
        "dtype": "float32", "max_length": 256, "rewards": [f"{tmp_path / 'rewards.py'}:length"], "max_steps": 2,
        "per_device_batch_size": 2, "num_generations": 3, "max_completion_length": 6, "learning_rate": 1e-3,
        "report_to": ["jsonl"], "output_dir": str(tmp_path / "out"), "save_steps": 1000, "seed": 0,
    }  # fmt: skip
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(config))
    assert main(["rl", "--config", str(tmp_path / "rl.yaml")]) == 0
    assert engines == [VllmEngine, VllmEngine]  # one rollout per step, both from vLLM
    records = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
