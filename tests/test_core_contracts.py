"""The contract checks plugin authors run: each passes a correct spec and catches a broken one."""

from __future__ import annotations

import functools
import json
import math

import pytest
from vistune import hookimpl
from vistune.adapters.options import LORA_OPTIONS
from vistune.config import RunConfig
from vistune.errors import DataError
from vistune.plugins import PluginManager
from vistune.specs import Adapter, Algorithm, Backend, Dataset, ModelType, Reward, Template
from vistune.templates import IGNORE_INDEX, Sample
from vistune.testing import (
    ContractError,
    check_adapter,
    check_algorithm,
    check_backend,
    check_dataset,
    check_model_type,
    check_reward,
    check_template,
)

# -- rewards -----------------------------------------------------------------------------


def contains_answer(prompts, completions, answer, **columns):
    return [None if a is None else float(a.lower() in c.lower()) for c, a in zip(completions, answer)]


def make_async(scale=1.0):
    async def reward(prompts, completions, **columns):
        return [scale * len(c) for c in completions]

    return reward


@pytest.mark.parametrize(
    ("factory", "options", "expected"),
    [
        (lambda: contains_answer, None, [1.0, 0.0, None]),
        (make_async, {"scale": 0.5}, [2.0, 1.5, 1.0]),
    ],
)
def test_check_reward_passes_sync_and_async_rewards(factory, options, expected):
    spec = Reward("answer", factory=factory)
    scores = check_reward(spec, ["q"] * 3, ["Red.", "sky", "no"], {"answer": ["red", "blue", None]}, options)
    assert scores == expected


def test_check_reward_works_inside_a_running_event_loop():
    import asyncio

    async def from_async_code():
        return check_reward(Reward("a", factory=make_async), ["q"], ["abc"])

    assert asyncio.run(from_async_code()) == [3.0]


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        (lambda p, c, **k: [1.0], r"returned 1 score\(s\) for 2 completion\(s\)"),
        (lambda p, c, **k: [1.0, math.nan], "score 1 is nan"),
        (lambda p, c, **k: [True, 1.0], "score 0 is True"),
        (lambda p, c, **k: "1.0", "must return a list"),
    ],
)
def test_check_reward_catches_bad_scores(reward, message):
    with pytest.raises(ContractError, match=message):
        check_reward(Reward("bad", factory=lambda: reward), ["q", "q"], ["a", "b"])


def test_check_reward_reports_an_unimportable_factory():
    with pytest.raises(ContractError, match=r"factory 'no_such_module:make' cannot be loaded: ModuleNotFoundError"):
        check_reward(Reward("missing", factory="no_such_module:make"), ["q"], ["a"])


# -- templates ---------------------------------------------------------------------------


class CharTokenizer:
    """One token per character: enough for a template to be checked against."""

    def encode(self, text):
        return [ord(ch) for ch in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i < 0xE000)


END = 0xE001  # a special token, dropped by decode


class ToyEncoder:
    """``<role>content`` turns; labels on assistant content and its end token.  ``bug`` breaks one promise."""

    def __init__(self, processor, options, bug=None):
        self.tok, self.options, self.bug = processor, options, bug

    def _turns(self, messages):
        ids, labels = [], []
        for message in messages:
            header = self.tok.encode(f"<{message['role']}>")
            body = self.tok.encode(message["content"]) + [END]
            supervised = message["role"] == "assistant" or self.bug == "user-supervised"
            ids += header + body
            labels += [IGNORE_INDEX] * len(header) + (body if supervised else [IGNORE_INDEX] * len(body))
        return ids, labels

    def encode(self, sample):
        ids, labels = self._turns(sample.messages)
        if len(ids) > self.options.max_length and self.bug != "no-truncation":
            if self.options.truncation == "drop":
                return None
            raise DataError(f"{sample.source}: {len(ids)} tokens > max_length {self.options.max_length}")
        if self.bug == "short-labels":
            labels = labels[:-1]
        if self.bug == "shifted-labels":
            labels = labels[1:] + [IGNORE_INDEX]
        if self.bug == "tuple-of-str":
            ids = [str(i) for i in ids]
        out = {"input_ids": ids, "labels": labels}
        if sample.images and self.bug != "no-pixels":
            out["pixel_values"] = [[0.0]] * len(sample.images)
        return out

    def encode_prompt(self, sample):
        ids, _ = self._turns(sample.messages)
        header = "<assistant>" if self.bug != "prompt-mismatch" else "<bot>"
        out = {"input_ids": ids + self.tok.encode(header)}
        if sample.images:
            out["pixel_values"] = [[0.0]] * len(sample.images)
        return out

    def decode(self, token_ids):
        return self.tok.decode(token_ids)


SAMPLE = Sample(
    messages=[
        {"role": "system", "content": "You describe pictures."},
        {"role": "user", "content": "<image>\nWhat colour is the circle?"},
        {"role": "assistant", "content": "The circle is red."},
    ],
    images=["circle.png"],
    source="data.jsonl:1",
)


def test_check_template_passes_a_correct_template():
    encoded = check_template(Template("toy", factory=ToyEncoder), CharTokenizer(), SAMPLE)
    supervised = [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]
    assert CharTokenizer().decode(supervised) == "The circle is red."


@pytest.mark.parametrize(
    ("bug", "message"),
    [
        ("user-supervised", r"the system text 'Youdescribepictures\.' is supervised"),
        ("short-labels", r"input_ids has \d+ tokens but labels has \d+"),
        ("shifted-labels", r"labels\[\d+\] is \d+ but input_ids\[\d+\] is \d+"),
        ("tuple-of-str", r"input_ids'\] must be a list of ints"),
        ("no-pixels", "the sample has images but encode\\(\\) returned no pixel_values"),
        ("no-truncation", "with truncation 'drop' must give None"),
        ("prompt-mismatch", "do not start encode\\(\\)'s training sequence \\(first difference at token"),
    ],
)
def test_check_template_catches_broken_templates(bug, message):
    spec = Template("toy", factory=functools.partial(ToyEncoder, bug=bug))
    with pytest.raises(ContractError, match=message):
        check_template(spec, CharTokenizer(), SAMPLE)


def test_check_template_needs_a_sample_with_an_answer():
    with pytest.raises(ContractError, match="ends with an assistant message"):
        check_template(Template("toy", factory=ToyEncoder), CharTokenizer(), Sample(messages=SAMPLE.messages[:2]))


# -- algorithms and backends ---------------------------------------------------------------


def toy_grpo(config, bug=None):
    """GRPO's group-normalised advantages and clipped surrogate, built on vistune.rl.objectives' conventions."""
    import torch
    from vistune.rl.algorithm import PolicyLoss, RLAlgorithm

    class ToyGrpo(RLAlgorithm):
        name = "toy-grpo"
        beta = config.beta
        epsilon_high = config.epsilon_high

        def shape_rewards(self, rewards, rollout):
            return torch.nan_to_num(rewards) if bug == "nan-to-zero" else rewards

        def advantages(self, rewards):
            mean = rewards.nanmean(dim=1, keepdim=True)
            centred = rewards - mean
            std = centred.pow(2).nanmean(dim=1, keepdim=True).sqrt()
            if bug == "zero-std":
                return torch.nan_to_num(centred, nan=0.0) / std
            return torch.nan_to_num(centred / (std + 1e-4), nan=0.0)

        def loss(self, batch):
            ratio = torch.exp(batch.logps - batch.old_logps)
            surrogate = torch.minimum(ratio * batch.advantages[:, None],
                                      ratio.clamp(0.8, 1.2) * batch.advantages[:, None])  # fmt: skip
            loss = -(surrogate * batch.mask).sum() / batch.num_tokens
            return loss.item() if bug == "float-loss" else PolicyLoss(loss, {"importance_ratio": ratio.mean().item()})

    return ToyGrpo()


def test_check_algorithm_runs_every_step_of_a_correct_algorithm():
    algorithm = check_algorithm(Algorithm("toy-grpo", factory=toy_grpo, defaults={"epsilon_high": 0.28}),
                                RunConfig(task="rl", epsilon_high=0.28))  # fmt: skip
    assert algorithm.epsilon_high == 0.28 and algorithm.needs_reference_model() is False


@pytest.mark.parametrize(
    ("defaults", "bug", "message"),
    [
        ({"epsilon_hi": 0.28}, None, r"unknown key 'epsilon_hi' \(did you mean epsilon_high\?\)"),
        ({"num_generations": "eight"}, None, "num_generations must be an integer"),
        ({}, "zero-std", "advantages are not all finite"),
        ({}, "nan-to-zero", "shape_rewards turned the NaN of an unscored completion into a number"),
        ({}, "float-loss", "loss\\(\\) must return a PolicyLoss, got float"),
    ],
)
def test_check_algorithm_catches_broken_algorithms(defaults, bug, message):
    spec = Algorithm("toy-grpo", factory=functools.partial(toy_grpo, bug=bug), defaults=defaults)
    with pytest.raises(ContractError, match=message):
        check_algorithm(spec, RunConfig(task="rl"))


def test_check_algorithm_refuses_reads_of_keys_the_config_lacks():
    spec = Algorithm("toy-offline", factory=toy_grpo, pipeline=toy_grpo, reads=("dataloader_workers",))
    with pytest.raises(ContractError, match="reads dataloader_workers, which are not config keys"):
        check_algorithm(spec, RunConfig(task="rl"))


def test_check_algorithm_needs_the_whole_interface():
    with pytest.raises(ContractError, match=r"lacks RLAlgorithm member\(s\) advantages, beta, loss"):
        check_algorithm(Algorithm("half", factory=lambda config: type("Half", (), {"name": "half"})()), RunConfig())


class EchoEngine:
    """Answers with the first characters of the prompt, one token per character."""

    max_model_len = 64

    def __init__(self, bug=None):
        self.bug, self.closed = bug, False

    def _complete(self, request):
        from vistune.inference import FINISH_LENGTH, CompletionOutput, GenerationResult

        text = request.prompt[: request.sampling.max_tokens]
        output = CompletionOutput(0, text, [ord(c) for c in text], FINISH_LENGTH)
        return GenerationResult(request.request_id, [output], len(request.prompt))

    def generate(self, requests):
        results = [self._complete(r) for r in requests]
        return results[::-1] if self.bug == "reversed" else results

    async def stream(self, request):
        from vistune.inference import StreamEvent

        text = self._complete(request).text + ("!" if self.bug == "stream-differs" else "")
        for i, ch in enumerate(text):
            yield StreamEvent(0, ch, (ord(ch),), "length" if i == len(text) - 1 else None, len(request.prompt))

    def add_adapter(self, name, path):
        pass

    def close(self):
        self.closed = True


MODEL_TYPE = ModelType("toy", loader="a.b:c", default_template="chat-template", language_model=("model",))


def test_check_backend_generates_and_streams(tmp_path):
    seen = []

    def factory(model_path, model_type, config):
        seen.append((model_path, model_type.name, config.max_new_tokens))
        return EchoEngine()

    engine = check_backend(Backend("echo", factory=factory), tmp_path, MODEL_TYPE, RunConfig(max_new_tokens=5))
    assert seen == [(str(tmp_path), "toy", 5)] and not engine.closed


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        (EchoEngine(bug="reversed"), "generate\\(\\) must return results in request order"),
        (EchoEngine(bug="stream-differs"), "stream\\(\\) gave 'Hell!' where generate\\(\\) gave 'Hell'"),
        (type("NoStream", (), {"max_model_len": 8, "generate": lambda self, r: []})(),
         r"lacks Engine member\(s\) add_adapter, close, stream"),
    ],
)  # fmt: skip
def test_check_backend_catches_broken_engines(tmp_path, engine, message):
    with pytest.raises(ContractError, match=message):
        check_backend(Backend("echo", factory=lambda *args: engine), tmp_path, MODEL_TYPE, RunConfig())


def test_check_backend_checks_requirements(tmp_path):
    with pytest.raises(ContractError, match="needs no_such_engine_lib, which is not installed"):
        check_backend(Backend("toy", factory=lambda *a: EchoEngine(), requires=("no_such_engine_lib",)), tmp_path,
                      MODEL_TYPE, RunConfig())  # fmt: skip


# -- datasets ---------------------------------------------------------------------------


def write_image(path, colour=(200, 20, 20)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def build_messages(directory, spec, tags_per_record=1):
    write_image(directory / "images" / "0.png")
    content = "<image>" * tags_per_record + "What is it?"
    record = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "a cup"}],
              "images": ["0.png"], "answer": "cup"}  # fmt: skip
    (directory / spec.data_file).write_text(json.dumps(record) + "\n")


def test_check_dataset_builds_and_reads_generated_datasets():
    spec = Dataset("toy", format="messages", data_file="train.jsonl", image_dir="images", builder=build_messages)
    (sample,) = check_dataset(spec)
    assert sample.messages[1] == {"role": "assistant", "content": "a cup"}
    assert sample.images[0].size == (8, 8) and sample.columns["answer"] == "cup"
    broken = Dataset("toy", format="messages", data_file="train.jsonl", image_dir="images",
                     builder=functools.partial(build_messages, tags_per_record=2))  # fmt: skip
    with pytest.raises(ContractError, match=r"train\.jsonl:1: 2 <image> tag\(s\) but 1 image\(s\)"):
        check_dataset(broken)


def test_check_dataset_checks_local_copies(tmp_path):
    spec = Dataset("toy-llava", format="llava-instruct", data_file="data.json", image_dir="coco")
    record = {"image": "1.jpg", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "A"}]}
    (tmp_path / "data.json").write_text(json.dumps([record]))
    with pytest.raises(ContractError, match=r"Dataset 'toy-llava': .*1\.jpg"):
        check_dataset(spec, tmp_path)
    write_image(tmp_path / "coco" / "1.jpg")
    (sample,) = check_dataset(spec, tmp_path)
    assert sample.messages == [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "A"}]
    (tmp_path / "data.json").write_text(json.dumps([{"conversations": [{"role": "user", "content": "x"}]}]))
    with pytest.raises(ContractError, match="conversation turn 0 must be"):
        check_dataset(spec, tmp_path)
    with pytest.raises(ContractError, match="does not exist"):
        check_dataset(spec, tmp_path / "elsewhere")


def test_check_dataset_without_a_local_copy_checks_users_can_find_it():
    assert check_dataset(Dataset("hub", format="llava-instruct", hf_repo_id="org/data")) == []
    with pytest.raises(ContractError, match="users cannot learn where to get it"):
        check_dataset(Dataset("nowhere", format="messages"))


# -- model types and adapters, on the tiny Llava fixture ----------------------------------

LLAVA_PARTS = {
    "vision_tower": ("model.vision_tower",),
    "projector": ("model.multi_modal_projector",),
    "language_model": ("model.language_model", "lm_head"),
}


def load_tiny_llava(path, options):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path), CharTokenizer()


@pytest.fixture(scope="module")
def templates_pm():
    pm = PluginManager()

    class Templates:
        @hookimpl
        def vistune_register_templates(self, register):
            register(Template("toy-llava", factory=ToyEncoder))

    pm.add_plugin(Templates(), name="templates")
    return pm


def llava_type(**overrides):
    fields = {"architectures": ("LlavaForConditionalGeneration",), "default_template": "toy-llava", **LLAVA_PARTS,
              **overrides}  # fmt: skip
    return ModelType("toy-llava", loader=load_tiny_llava, **fields)


def test_check_model_type_passes_a_correct_model_type(tiny_llava, templates_pm):
    model, processor = check_model_type(llava_type(), tiny_llava, plugin_manager=templates_pm)
    assert type(model).__name__ == "LlavaForConditionalGeneration" and isinstance(processor, CharTokenizer)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"projector": ("model.mm_projector",)}, r"projector prefix 'model\.mm_projector' matches no module .*"
                                                 r"top-level modules: lm_head, model"),
        ({"language_model": ("model",)}, r"vision_tower prefix 'model\.vision_tower' lies inside language_model"),
        ({"architectures": ("LlavaNextForConditionalGeneration",)}, "matches neither architectures"),
        ({"default_template": "unregistered"}, "default_template 'unregistered' is not registered"),
        ({"language_model": ()}, "language_model is empty"),
    ],
)
def test_check_model_type_catches_broken_model_types(tiny_llava, templates_pm, overrides, message):
    with pytest.raises(ContractError, match=message):
        check_model_type(llava_type(**overrides), tiny_llava, plugin_manager=templates_pm)


def lora_apply(model, model_type, config, language_model_only=True, train_projector=False):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "v_proj"]
    target = rf".*language_model.*\.({'|'.join(targets)})" if language_model_only else targets
    save = list(model_type.projector) if train_projector else None
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=target, modules_to_save=save))


def full_apply(model, model_type, config, honour_freeze=True):
    for name, parameter in model.named_parameters():
        frozen = honour_freeze and (
            (config.freeze_vision_tower and name.startswith(model_type.vision_tower))
            or (config.freeze_projector and name.startswith(model_type.projector))
        )
        parameter.requires_grad_(not frozen)
    return model


@pytest.mark.parametrize(
    ("apply", "config", "message"),
    [
        (lora_apply, RunConfig(), None),
        (functools.partial(lora_apply, language_model_only=False), RunConfig(),
         r"scope is language_model but \d+ trainable parameter\(s\) sit in the vision tower"),
        # the adapter's own scope option (declared as LoRA's) allows the vision tower
        (functools.partial(lora_apply, language_model_only=False), RunConfig(options={"toy": {"scope": "all"}}), None),
        (full_apply, RunConfig(freeze_projector=True), None),
        (functools.partial(full_apply, honour_freeze=False), RunConfig(),
         r"freeze_vision_tower is true but \d+ of its weights are trainable"),
        (lambda model, model_type, config: model.requires_grad_(False), RunConfig(), "no parameter is trainable"),
        (functools.partial(lora_apply, train_projector=True), RunConfig(freeze_projector=False), None),
        (lora_apply, RunConfig(freeze_projector=False),
         "freeze_projector is false but none of the projector parameters is trainable"),
    ],
)  # fmt: skip
def test_check_adapter(tiny_llava, apply, config, message):
    model, _ = load_tiny_llava(tiny_llava, None)
    spec = Adapter("toy", apply=apply, options=LORA_OPTIONS)
    if message is None:
        trained = check_adapter(spec, model, llava_type(), config)
        assert any(p.requires_grad for p in trained.parameters())
    else:
        with pytest.raises(ContractError, match=message):
            check_adapter(spec, model, llava_type(), config)


def test_check_adapter_catches_a_lora_that_leaves_base_weights_trainable(tiny_llava):
    def leaky(model, model_type, config):
        model = lora_apply(model, model_type, config)
        model.base_model.model.lm_head.weight.requires_grad_(True)
        return model

    model, _ = load_tiny_llava(tiny_llava, None)
    with pytest.raises(ContractError, match=r"1 base weight\(s\) are trainable, e\.g\. \['lm_head\.weight'\]"):
        check_adapter(Adapter("leaky", apply=leaky), model, llava_type(), RunConfig())
