"""Rollout tensors: a padded batch of [prompt | completion] rows scores each completion exactly as it scores alone."""

import pytest
import torch
from vistune.errors import DataError
from vistune.models import LoadOptions
from vistune.rl.rollout import Group, completion_logps, image_placeholder_ids, policy_inputs, prompt_of
from vistune.specs import load_ref
from vistune.templates import Sample, TemplateOptions


def test_prompt_of_cuts_the_answer():
    record = Sample(
        messages=[{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "a red circle"}],
        images=["x.png"], columns={"id": 3}, source="d.jsonl:1",
    )  # fmt: skip
    prompt = prompt_of(record)
    assert prompt.messages == [{"role": "user", "content": "<image>\nWhat?"}]
    assert prompt.columns == {"id": 3, "answer": "a red circle"} and prompt.images == ["x.png"]
    own = prompt_of(Sample(messages=record.messages, columns={"answer": "kept"}))
    assert own.columns["answer"] == "kept"
    with pytest.raises(DataError, match="d.jsonl:2: no user message"):
        prompt_of(Sample(messages=[{"role": "assistant", "content": "hi"}], source="d.jsonl:2"))


def _load(plugin_manager, model_type_name, path):
    model_type = plugin_manager.registries.models.get(model_type_name)
    model, processor = load_ref(model_type.loader)(str(path), LoadOptions(dtype="float32", device="cpu"))
    template = plugin_manager.registries.templates.get(model_type.default_template)
    encoder = load_ref(template.factory)(processor, TemplateOptions(max_length=512))
    return model.eval(), processor, encoder


def _image(colour, size):
    from PIL import Image

    return Image.new("RGB", size, colour)


def _alone(model, group, i):
    """Log-probabilities of one completion from an unpadded forward pass of its own sequence."""
    encoded = group.encoded
    prompt = encoded["input_ids"]
    completion = group.completion_ids[i]
    ids = torch.tensor([prompt + completion])
    kwargs = {}
    for key, value in encoded.items():
        if key == "input_ids" or value is None:
            continue
        if isinstance(value, list) and len(value) == len(prompt):
            kwargs[key] = torch.tensor([value + [0] * len(completion)])
        else:
            kwargs[key] = torch.as_tensor(value)
    logits = model(input_ids=ids, **kwargs).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion).unsqueeze(1)).squeeze(1)


CASES = {
    "llama": ("causal-lm", False),
    "llava": ("llava", True),
    "llava_next": ("llava-next", True),
    "qwen2_vl": ("qwen2-vl", True),
    "qwen2_5_vl": ("qwen2.5-vl", True),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_padded_rows_score_like_single_sequences(request, plugin_manager, kind):
    model_type, vision = CASES[kind]
    model, _processor, encoder = _load(plugin_manager, model_type, request.getfixturevalue(f"tiny_{kind}"))
    questions = ["What is it?", "Describe the picture in a few words, please, with colours."]
    sizes = [(32, 32), (48, 32)]
    groups = []
    generator = torch.Generator().manual_seed(0)
    for question, size in zip(questions, sizes):
        content = f"<image>\n{question}" if vision else question
        prompt = Sample(messages=[{"role": "user", "content": content}], images=[_image("red", size)] if vision else [])
        completions = [torch.randint(10, 60, (n,), generator=generator).tolist() for n in (3, 7)]
        groups.append(Group(prompt, dict(encoder.encode_prompt(prompt)), completions, ["", ""], [False, False]))
    assert len(groups[0].encoded["input_ids"]) != len(groups[1].encoded["input_ids"])  # prompts really are padded
    inputs = policy_inputs(groups, pad_id=0, model=model)
    with torch.no_grad():
        batched = completion_logps(model, inputs)
        row = 0
        for group in groups:
            for i, completion in enumerate(group.completion_ids):
                torch.testing.assert_close(
                    batched[row, : len(completion)], _alone(model, group, i), rtol=1e-4, atol=1e-4
                )
                assert inputs["completion_mask"][row].sum().item() == len(completion)
                row += 1


def test_sampled_image_placeholder_is_scored_but_not_fed(plugin_manager, tiny_llava):
    model, _processor, encoder = _load(plugin_manager, "llava", tiny_llava)
    [image_token] = image_placeholder_ids(model)
    prompt = Sample(messages=[{"role": "user", "content": "<image>\nWhat?"}], images=[_image("blue", (32, 32))])
    completions = [[20, 21, image_token, 22, 23], [24, 25]]
    group = Group(prompt, dict(encoder.encode_prompt(prompt)), completions, ["", ""], [False, False])
    inputs = policy_inputs([group], pad_id=0, model=model)
    assert inputs["completion_mask"].sum(dim=1).tolist() == [3.0, 2.0]  # up to and including the placeholder
    assert (inputs["input_ids"] == image_token).sum().item() == 2 * 16  # only the prompts' image tokens
    with torch.no_grad():
        logps = completion_logps(model, inputs)  # would raise "image features and image tokens do not match"
    assert torch.isfinite(logps[0, :3]).all()


def test_rollout_engines_come_from_the_backend():
    from vistune.errors import ConfigError
    from vistune.inference.transformers_engine import TransformersEngine
    from vistune.rl.rollout import engine_factory, make_engine
    from vistune.specs import Backend

    assert engine_factory(None) == TransformersEngine.from_model

    class Rollouts:
        @classmethod
        def from_model(cls, model, processor, encoder, *, max_batch_size, config):
            return (model, processor, encoder, max_batch_size, config)

    class ServingOnly:
        pass

    backend = Backend("with-rollouts", factory=Rollouts)
    assert make_engine(backend, "m", "p", "e", 12, config="c") == ("m", "p", "e", 12, "c")
    with pytest.raises(ConfigError, match="'serving-only' cannot sample RL rollouts") as info:
        engine_factory(Backend("serving-only", factory=ServingOnly))
    assert "backend: transformers" in info.value.hint
