"""Text causal LMs: the loader's options, and the chat-template encoder checked against transformers."""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vistune.causal_lm import load_causal_lm, pretrained_kwargs
from vistune.chat_template import ChatTemplateEncoder
from vistune.errors import ConfigError, DataError
from vistune.models import LoadOptions
from vistune.quantization import get_scheme
from vistune.templates import IGNORE_INDEX, Sample, TemplateOptions

# meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json "chat_template".
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

SYSTEM = {"role": "system", "content": "You answer in few words."}
CONVERSATIONS = {
    "single-turn": [
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "The sky is blue."},
    ],
    "multi-turn": [
        {"role": "user", "content": "What shape is red?"},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "And the green one?"},
        {"role": "assistant", "content": "It is a square.\nA big one."},
    ],
    "system": [
        SYSTEM,
        {"role": "user", "content": "Count the shapes."},
        {"role": "assistant", "content": "There are 3 shapes."},
    ],
}


@pytest.fixture(scope="module")
def llama(tiny_llama):
    """The tiny Llama with its ChatML (Qwen2) chat template."""
    return load_causal_lm(str(tiny_llama), LoadOptions(device="cpu"))


@pytest.fixture(scope="module")
def llama3_tokenizer(tiny_llama):
    """The tiny tokenizer with Llama-3's header and end-of-turn tokens and chat template."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_llama))
    tokenizer.add_tokens(LLAMA3_TOKENS, special_tokens=True)
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


def _tokenizer(request, style):
    if style == "chatml":
        return request.getfixturevalue("llama")[1]
    return request.getfixturevalue("llama3_tokenizer")


def expected_labels(tokenizer, input_ids, header: list[int], end_of_turn: int) -> list[int]:
    """Labels built without the encoder: every token after an assistant header up to and including the end of turn."""
    labels = [IGNORE_INDEX] * len(input_ids)
    i = 0
    while i < len(input_ids):
        if input_ids[i : i + len(header)] == header:
            j = i + len(header)
            while input_ids[j] != end_of_turn:
                labels[j] = input_ids[j]
                j += 1
            labels[j] = input_ids[j]
            i = j
        i += 1
    return labels


def header_and_end(tokenizer, style):
    ids = tokenizer.convert_tokens_to_ids
    if style == "chatml":
        return [ids("<|im_start|>"), *tokenizer.encode("assistant\n", add_special_tokens=False)], ids("<|im_end|>")
    header = [
        ids("<|start_header_id|>"),
        *tokenizer.encode("assistant", add_special_tokens=False),
        ids("<|end_header_id|>"),
    ]
    return header + tokenizer.encode("\n\n", add_special_tokens=False), ids("<|eot_id|>")


# -- loader -----------------------------------------------------------------------------


def test_loader_defaults_to_float32_sdpa_on_cpu(llama):
    model, tokenizer = llama
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert not model.training
    assert tokenizer.pad_token is not None


def test_loader_honours_dtype_attention_and_training(tiny_llama):
    model, _ = load_causal_lm(str(tiny_llama), LoadOptions(device="cpu", dtype="bfloat16", attn_implementation="eager",
                                                           for_training=True))  # fmt: skip
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert model.config.use_cache is False
    embeddings = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert embeddings.requires_grad  # enable_input_require_grads, for gradient checkpointing under adapters


def test_loader_passes_trust_remote_code(tiny_llama, monkeypatch):
    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs)
        kwargs["trust_remote_code"] = False
        return original(path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_causal_lm(str(tiny_llama), LoadOptions(device="cpu", trust_remote_code=True))
    assert seen["trust_remote_code"] is True


def test_loader_sets_a_missing_pad_token(tiny_llama, tmp_path):
    directory = shutil.copytree(tiny_llama, tmp_path / "no-pad")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(str(directory))
    assert transformers.AutoTokenizer.from_pretrained(str(directory)).pad_token is None
    model, tokenizer = load_causal_lm(str(directory), LoadOptions(device="cpu"))
    assert tokenizer.pad_token == tokenizer.eos_token
    assert model.generation_config.pad_token_id is not None


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_bitsandbytes_quantization_on_cpu_is_a_clear_error(scheme):
    with pytest.raises(ConfigError, match=f"quantization '{scheme}'.*CUDA"):
        pretrained_kwargs(LoadOptions(device="cpu", quantization=get_scheme(scheme)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        pretrained_kwargs(LoadOptions(device="cuda"))


def test_auto_dtype_and_device():
    kwargs = pretrained_kwargs(LoadOptions())
    if torch.cuda.is_available():
        assert kwargs["device_map"] == {"": 0}
    else:
        assert kwargs["dtype"] == torch.float32 and "device_map" not in kwargs


# -- encoder: parity with transformers ------------------------------------------------


@pytest.mark.parametrize("style", ["chatml", "llama3"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_input_ids_match_apply_chat_template_and_labels_cover_answers(request, style, name):
    tokenizer = _tokenizer(request, style)
    messages = CONVERSATIONS[name]
    encoded = ChatTemplateEncoder(tokenizer).encode(Sample(messages, source="chat.jsonl:1"))
    reference = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert encoded["input_ids"] == list(reference)
    header, end_of_turn = header_and_end(tokenizer, style)
    assert encoded["labels"] == expected_labels(tokenizer, encoded["input_ids"], header, end_of_turn)
    # Each supervised run is exactly one answer's tokens followed by the end-of-turn token.
    runs, run = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"]):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert runs == [tokenizer.encode(a.strip(), add_special_tokens=False) + [end_of_turn] for a in answers]


def test_loss_equals_loss_on_hf_encoding(llama):
    model, tokenizer = llama
    encoder = ChatTemplateEncoder(tokenizer)
    header, end_of_turn = header_and_end(tokenizer, "chatml")
    for messages in CONVERSATIONS.values():
        ours = encoder.encode(Sample(messages))
        hf_ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
        hf_labels = expected_labels(tokenizer, hf_ids, header, end_of_turn)
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ours["input_ids"]]), labels=torch.tensor([ours["labels"]])).loss
            reference = model(input_ids=torch.tensor([hf_ids]), labels=torch.tensor([hf_labels])).loss
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)


def test_encode_prompt_is_the_generation_prompt_and_starts_the_training_sequence(llama):
    tokenizer = llama[1]
    messages = CONVERSATIONS["multi-turn"]
    encoder = ChatTemplateEncoder(tokenizer)
    prompt = encoder.encode_prompt(Sample(messages[:3]))["input_ids"]
    assert prompt == list(tokenizer.apply_chat_template(messages[:3], add_generation_prompt=True, tokenize=True,
                                                        return_dict=False))  # fmt: skip
    full = encoder.encode(Sample(messages))["input_ids"]
    assert full[: len(prompt)] == prompt
    assert encoder.decode(full[len(prompt) :]) == "It is a square.\nA big one.\n"


def test_generation_blocks_are_used_when_the_template_has_them(tiny_llama):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_llama))
    # ChatML, with the answer and its <|im_end|> marked as transformers' assistant mask expects.
    tokenizer.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    messages = CONVERSATIONS["multi-turn"]
    encoded = ChatTemplateEncoder(tokenizer).encode(Sample(messages))
    reference = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert encoded["input_ids"] == reference["input_ids"]
    assert encoded["labels"] == [
        t if m else IGNORE_INDEX for t, m in zip(reference["input_ids"], reference["assistant_masks"])
    ]


# -- encoder: errors --------------------------------------------------------------------


def test_images_are_rejected_by_a_text_model(llama):
    sample = Sample([{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "a dog"}],
                    images=["dog.png"], source="data.jsonl:7")  # fmt: skip
    with pytest.raises(DataError, match=r"data.jsonl:7.*image.*text model"):
        ChatTemplateEncoder(llama[1]).encode(sample)


def test_too_long_samples_raise_or_are_dropped(llama):
    sample = Sample(CONVERSATIONS["multi-turn"], source="data.jsonl:12")
    length = len(ChatTemplateEncoder(llama[1]).encode(sample)["input_ids"])
    assert ChatTemplateEncoder(llama[1], TemplateOptions(max_length=length)).encode(sample) is not None
    with pytest.raises(DataError, match=rf"data.jsonl:12: {length} tokens, longer than max_length {length - 1}"):
        ChatTemplateEncoder(llama[1], TemplateOptions(max_length=length - 1)).encode(sample)
    assert (
        ChatTemplateEncoder(llama[1], TemplateOptions(max_length=length - 1, truncation="drop")).encode(sample) is None
    )


def test_malformed_samples_name_their_source(llama):
    encoder = ChatTemplateEncoder(llama[1])
    with pytest.raises(DataError, match="data.jsonl:3: no assistant message"):
        encoder.encode(Sample([{"role": "user", "content": "hi"}], source="data.jsonl:3"))
    with pytest.raises(DataError, match="data.jsonl:4: message 0"):
        encoder.encode(Sample([{"role": "robot", "content": "hi"}], source="data.jsonl:4"))


def test_a_template_that_rewrites_earlier_turns_is_reported(tiny_llama):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_llama))
    tokenizer.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    )
    with pytest.raises(DataError, match=r"(?s)data.jsonl:5.*generation"):
        ChatTemplateEncoder(tokenizer).encode(Sample(CONVERSATIONS["single-turn"], source="data.jsonl:5"))


def test_a_tokenizer_without_chat_template_is_a_config_error(tiny_llama):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_llama))
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        ChatTemplateEncoder(tokenizer)
