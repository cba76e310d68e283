"""Multimodal packing: a packed batch computes exactly what the same samples compute one by one.

The reference is the plain transformers model run on each sample alone (Qwen2-VL computing
its own multimodal RoPE positions from ``mm_token_type_ids``); the packed batch must give the
same logits per sample, the same loss (token-level mean over all samples) and the same gradients.

What runs where for ``vistune_varlen``: PyTorch's flash varlen kernel (``aten::_flash_attention_forward``)
has no CPU implementation.  On CPU the packed-batch test runs ``vistune_varlen`` twice: as its dense-mask
fallback (what CPU runs use), and along its variable-length path with only the kernel replaced by sdpa
per segment (:func:`segmentwise_varlen_attn`).  That covers the segments handed to the kernel (checked
against transformers' own cu_seqlens construction), padding removal, grouped KV heads and the output
layout.  NOT covered on CPU, so not in CI: the kernel's own numerics (fp16/bf16 flash); they are compared
with the replacement only on a CUDA machine (``test_the_cuda_kernel_keeps_the_contract_the_cpu_tests_assume``).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
import torch.nn.functional as F  # noqa: E402

from vistune.data.packing import (  # noqa: E402
    PackedDataset,
    collate_packed,
    first_fit_decreasing,
    make_row,
    pack_dataset,
    trainer_overrides,
)
from vistune.errors import DataError  # noqa: E402
from vistune.specs import ModelType  # noqa: E402
from vistune.templates import IGNORE_INDEX  # noqa: E402
from vistune.training.lm_loss import causal_lm_loss  # noqa: E402

LLAVA = ModelType(
    "test-llava", loader="transformers:AutoModelForImageTextToText", default_template="test",
    vision_tower=("model.vision_tower",), projector=("model.multi_modal_projector",),
    language_model=("model.language_model", "lm_head"), supports_packing=True,
)  # fmt: skip
QWEN2_VL = ModelType(
    "test-qwen2-vl", loader="transformers:AutoModelForImageTextToText", default_template="test",
    vision_tower=("model.visual",), projector=("model.visual.merger",),
    language_model=("model.language_model", "lm_head"), supports_packing=True,
)  # fmt: skip


def _load(path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model.train()  # the training path; the tiny configs have no dropout, so outputs are deterministic
    return model


def _text(gen, n, vocab_low=12, vocab_high=860):
    return torch.randint(vocab_low, vocab_high, (n,), generator=gen).tolist()


def _sample(prompt_ids, answer_ids, **images):
    input_ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return {"input_ids": input_ids, "labels": labels, **images}


def llava_samples(model, count=5, seed=0):
    """Samples shaped like the Llava template's: text, 16 <image> tokens per image, answer."""
    gen = torch.Generator().manual_seed(seed)
    image_id = model.config.image_token_id
    tokens_per_image = model.config.image_seq_length
    size = model.config.vision_config.image_size
    samples = []
    for i in range(count):
        n_images = [1, 0, 2, 1, 1][i % 5]
        prompt = _text(gen, 3 + i)
        for _ in range(n_images):
            prompt += [image_id] * tokens_per_image + _text(gen, 2)
        images = {}
        if n_images:
            images["pixel_values"] = torch.randn(n_images, 3, size, size, generator=gen)
        samples.append(_sample(prompt, _text(gen, 4 + 2 * i), **images))
    return samples


def qwen_samples(model, count=5, seed=0):
    """Samples shaped like the Qwen2-VL template's: <|vision_start|>, merged patches, <|vision_end|>."""
    gen = torch.Generator().manual_seed(seed)
    config = model.config
    vision = config.vision_config
    merge = vision.spatial_merge_size
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    grids = [(1, 4, 4), (1, 2, 4), (1, 4, 6), (1, 2, 2)]
    samples = []
    for i in range(count):
        n_images = [1, 0, 2, 1, 1][i % 5]
        prompt = _text(gen, 3 + i)
        thw = []
        for j in range(n_images):
            t, h, w = grids[(i + j) % len(grids)]
            thw.append([t, h, w])
            prompt += [config.vision_start_token_id] + [config.image_token_id] * (t * h * w // merge**2)
            prompt += [config.vision_end_token_id] + _text(gen, 2)
        images = {}
        if thw:
            grid = torch.tensor(thw)
            images["image_grid_thw"] = grid
            images["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=gen)
        samples.append(_sample(prompt, _text(gen, 4 + 2 * i), **images))
    return samples


def llava_next_samples(processor, count=4):
    """Samples from the Llava-NeXT processor: images of different shapes give different patch counts."""
    from PIL import Image

    sizes = [(32, 64), (64, 64), (64, 32), (32, 32)]
    colours = ["red", "green", "blue", "white"]
    samples = []
    for i in range(count):
        image = Image.new("RGB", sizes[i % 4], colours[i % 4])
        prompt = "[INST] <image>\nWhat colour is the shape? [/INST]"
        answer = " a " + colours[i % 4] + " circle" * (i + 1)
        encoded = processor(text=prompt + answer, images=[image], return_tensors="pt")
        n_prompt = len(processor(text=prompt, images=[image], return_tensors="pt")["input_ids"][0])
        input_ids = encoded["input_ids"][0].tolist()
        labels = [IGNORE_INDEX] * n_prompt + input_ids[n_prompt:]
        samples.append({"input_ids": input_ids, "labels": labels, "pixel_values": encoded["pixel_values"],
                        "image_sizes": encoded["image_sizes"]})  # fmt: skip
    return samples


def _mm_token_type_ids(model, input_ids):
    types = torch.zeros_like(input_ids)
    types[input_ids == model.config.image_token_id] = 1
    return types


def unpacked_reference(model, samples):
    """Per-sample logits, and the loss/gradients of the token-level mean over all samples."""
    model.zero_grad()
    logits, total, count = [], 0.0, 0
    for sample in samples:
        input_ids = torch.tensor([sample["input_ids"]])
        labels = torch.tensor([sample["labels"]])
        kwargs = {k: v for k, v in sample.items() if k not in ("input_ids", "labels")}
        if "image_grid_thw" in kwargs:
            kwargs["mm_token_type_ids"] = _mm_token_type_ids(model, input_ids)
        out = model(input_ids=input_ids, labels=labels, **kwargs)
        n = int((labels[0, 1:] != IGNORE_INDEX).sum())
        logits.append(out.logits[0].detach())
        total = total + out.loss * n
        count += n
    loss = total / count
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return logits, loss.detach(), grads


def packed_run(model, groups):
    batch = collate_packed([make_row(group, positions=_positions(model)) for group in groups])
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = []
    for row, group in enumerate(groups):
        start = 0
        for sample in group:
            n = len(sample["input_ids"])
            logits.append(out.logits[row, start : start + n].detach())
            start += n
    return batch, logits, out.loss.detach(), grads


def _positions(model):
    from vistune.data.packing import position_function

    return position_function(model)


@pytest.fixture(scope="module")
def llava(tiny_llava):
    return _load(tiny_llava)


@pytest.fixture(scope="module")
def qwen2_vl(tiny_qwen2_vl):
    return _load(tiny_qwen2_vl)


@pytest.fixture(scope="module")
def llava_next(tiny_llava_next):
    return _load(tiny_llava_next)


def segmentwise_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                            window_size=(-1, -1), enable_gqa=False):  # fmt: skip
    """``torch.nn.attention.varlen.varlen_attn``'s contract, computed by PyTorch's sdpa one segment at a time.

    Tokens ``(total, heads, dim)`` in and out; segment ``i`` is ``cu_seq[i]:cu_seq[i + 1]``;
    ``window_size=(-1, 0)`` is causal.  Used where the flash kernel cannot run (CPU).
    """
    assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32 and int(cu_seq_q[-1]) == query.shape[0]
    lengths = cu_seq_q.diff()
    assert max_q == max_k == int(lengths.max()) and bool((lengths > 0).all())
    assert window_size in ((-1, 0), (-1, -1))
    bounds = cu_seq_q.tolist()
    out = [
        F.scaled_dot_product_attention(query[a:b].transpose(0, 1), key[a:b].transpose(0, 1), value[a:b].transpose(0, 1),
                                       is_causal=window_size == (-1, 0), scale=scale, enable_gqa=enable_gqa).transpose(0, 1)
        for a, b in zip(bounds, bounds[1:])
    ]  # fmt: skip
    return torch.cat(out)


@pytest.fixture
def varlen_on_cpu(monkeypatch, request):
    """vistune_varlen's segment path on CPU: only PyTorch's CUDA kernel is replaced, by :func:`segmentwise_varlen_attn`.

    Returns the cu_seqlens of every kernel call.  ``request.param`` (default True) says whether the kernel
    takes grouped KV heads itself (``enable_gqa``), else vistune repeats them.
    """
    from vistune import attention

    monkeypatch.setattr(attention, "_VARLEN_GQA", getattr(request, "param", True))
    monkeypatch.setattr(attention, "_varlen_applies",
                        lambda module, query, kv_len, dropout: query.shape[2] == kv_len and not (module.training and dropout > 0))  # fmt: skip
    calls = []
    monkeypatch.setattr(attention, "_VARLEN", lambda *a, **k: calls.append(a[3].tolist()) or segmentwise_varlen_attn(*a, **k))
    return calls


# "vistune_varlen" on CPU is its dense-mask fallback (what CPU runs use); "vistune_varlen-segments" is its
# variable-length path, which runs on CUDA, with only the CUDA kernel replaced by sdpa per segment.
@pytest.mark.parametrize("attention", ["sdpa", "vistune_varlen", "vistune_varlen-segments"])
@pytest.mark.parametrize("kind", ["llava", "llava-next", "qwen2-vl"])
def test_packed_batch_equals_samples_one_by_one(kind, attention, request):
    model = request.getfixturevalue(kind.replace("-", "_"))
    segment_calls = request.getfixturevalue("varlen_on_cpu") if attention.endswith("-segments") else None
    attention = attention.removesuffix("-segments")
    model_type = QWEN2_VL if kind == "qwen2-vl" else LLAVA
    if kind == "llava-next":
        from vistune.tiny_models import load_tiny_processor

        samples = llava_next_samples(load_tiny_processor("llava-next", request.getfixturevalue("tiny_llava_next")))
    else:
        samples = (llava_samples if kind == "llava" else qwen_samples)(model)
    text_config = model.config.get_text_config()
    text_config._attn_implementation = "sdpa"
    # switches the KV cache off, and with packed_attention the language model's attention, as the pipeline does
    pack_dataset([], 4096, model, model_type, packed_attention=attention != "sdpa")
    assert text_config._attn_implementation == attention
    # two rows of different lengths: the shorter one is padded with its own segment
    groups = [samples[:3], samples[3:]]
    batch, packed_logits, packed_loss, packed_grads = packed_run(model, groups)
    packed_calls = list(segment_calls or [])
    assert "attention_mask" not in batch
    assert batch["position_ids"].shape[-2:] == batch["input_ids"].shape
    if kind == "qwen2-vl":
        assert batch["position_ids"].shape[0] == 4  # text row + 3 mrope rows
    ref_logits, ref_loss, ref_grads = unpacked_reference(model, samples)

    if segment_calls is not None:  # every language-model layer went through the segments of the packed rows
        width, lengths = batch["input_ids"].shape[-1], []
        for group in groups:  # each sample is a segment, and a row's padding one more
            sizes = [len(sample["input_ids"]) for sample in group]
            lengths += sizes + ([width - sum(sizes)] if width > sum(sizes) else [])
        layers = model.config.get_text_config().num_hidden_layers
        assert len(packed_calls) == layers and all(calls == packed_calls[0] for calls in packed_calls)
        assert [b - a for a, b in zip(packed_calls[0], packed_calls[0][1:])] == lengths
    for got, want in zip(packed_logits, ref_logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_loss, ref_loss, atol=1e-6, rtol=1e-5)
    assert packed_grads.keys() == ref_grads.keys()
    vision_grads = [n for n in ref_grads if n.startswith(model_type.vision_tower[0] + ".")]
    assert vision_grads, "the vision tower's gradients are compared too"
    for name, want in ref_grads.items():
        torch.testing.assert_close(packed_grads[name], want, atol=1e-5, rtol=1e-4, msg=name)

    # the trainer's own loss (logits of the labelled positions only) on the same packed batch
    model.zero_grad()
    loss, _ = causal_lm_loss(model, batch)
    loss.backward()
    params = dict(model.named_parameters())
    torch.testing.assert_close(loss.detach(), ref_loss, atol=1e-6, rtol=1e-5)
    for name, want in ref_grads.items():
        torch.testing.assert_close(params[name].grad, want, atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad()


def test_without_resetting_positions_samples_would_mix(llava):
    """The check above can fail: one sample's logits change when positions run on across samples."""
    pack_dataset([], 4096, llava, LLAVA, packed_attention=False)  # no KV cache, as the pipeline packs
    samples = llava_samples(llava)
    row = make_row(samples[:2])
    n0 = len(samples[0]["input_ids"])
    with torch.no_grad():
        packed = llava(**collate_packed([row], pad_to_multiple_of=1)).logits[0]
        row["position_ids"] = torch.arange(len(row["input_ids"]))
        mixed = llava(**collate_packed([row], pad_to_multiple_of=1)).logits[0]
        alone = llava(
            input_ids=torch.tensor([samples[1]["input_ids"]]), pixel_values=samples[1].get("pixel_values")
        ).logits[0]
    torch.testing.assert_close(packed[n0:], alone, atol=1e-5, rtol=1e-5)
    assert (mixed[n0:] - alone).abs().max() > 1e-3


def test_loss_never_crosses_samples():
    a = {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}
    b = {"input_ids": [8, 9], "labels": [8, 9]}
    row = make_row([a, b])
    assert row["input_ids"].tolist() == [5, 6, 7, 8, 9]
    assert row["labels"].tolist() == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1]


def test_collate_pads_with_an_isolated_segment():
    rows = [make_row([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}]), make_row([{"input_ids": [8], "labels": [8]}])]
    batch = collate_packed(rows, pad_to_multiple_of=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    aligned = collate_packed(rows)  # rounded up to a multiple of 8 by default
    assert aligned["input_ids"].shape == (2, 8)
    assert aligned["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]


def test_segments_are_the_ones_transformers_derives_from_position_ids():
    """The cu_seqlens vistune_varlen hands the kernel, against transformers' own construction for flash varlen."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
    from vistune.attention import _Segments

    rows = [make_row([{"input_ids": [1] * n, "labels": [1] * n} for n in sizes]) for sizes in ([5, 3, 7], [2], [4, 4])]
    batch = collate_packed(rows)  # padded to a multiple of 8, the padding a segment of its own
    positions = batch["position_ids"]
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(positions)
    segments = _Segments(positions, None, *positions.shape, torch.device("cpu"))
    assert segments.cu_seqlens.tolist() == cu_q.tolist() == cu_k.tolist()
    assert segments.max_length == int(max_q)


@pytest.mark.parametrize("varlen_on_cpu", [True, False], indirect=True, ids=["kernel-gqa", "repeated-kv"])
def test_the_segment_path_drops_padding_and_groups_heads(varlen_on_cpu):
    """Left and right padding (2D mask) and grouped KV heads, against sdpa on each row's segments alone."""
    from vistune.attention import packed_attention_forward

    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 9, 8
    query = torch.randn(batch, heads, length, dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=generator) for _ in range(2))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0, 0]])
    positions = torch.tensor([[0, 0, 0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 0, 0, 0]])
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = packed_attention_forward(module, query, key, value, mask, scaling=0.3, position_ids=positions)
    assert out.shape == (batch, length, heads, dim) and len(varlen_on_cpu) == 1
    expected_segments = {0: [(2, 5), (5, 9)], 1: [(0, 2), (2, 6)]}
    for row, spans in expected_segments.items():
        for a, b in spans:
            want = F.scaled_dot_product_attention(query[row, :, a:b], key[row, :, a:b], value[row, :, a:b],
                                                  is_causal=True, scale=0.3, enable_gqa=True).transpose(0, 1)  # fmt: skip
            torch.testing.assert_close(out[row, a:b], want)
        assert not out[row][mask[row] == 0].any()  # padding positions are left at zero


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch's flash varlen kernel runs only on CUDA")
def test_the_cuda_kernel_keeps_the_contract_the_cpu_tests_assume():
    """What the CPU tests replace: PyTorch's own varlen kernel against :func:`segmentwise_varlen_attn`."""
    from vistune.attention import _VARLEN

    if _VARLEN is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    generator = torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0, 5, 12, 40], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(40, 4, 64, generator=generator, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for window in ((-1, 0), (-1, -1)):
        got = _VARLEN(q, k, v, cu, cu, 28, 28, scale=0.125, window_size=window)
        want = segmentwise_varlen_attn(q, k, v, cu, cu, 28, 28, scale=0.125, window_size=window)
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_segments_are_computed_again_for_a_new_shape():
    """The per-forward segment cache of vistune_varlen must not hand one batch's segments to the next."""
    from vistune.attention import _segments

    assert _segments(None, None, 2, 8, torch.device("cpu")).cu_seqlens.tolist() == [0, 8, 16]
    # without position ids or a mask, only the shape tells this forward pass from the last one
    assert _segments(None, None, 1, 4, torch.device("cpu")).cu_seqlens.tolist() == [0, 4]
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    assert _segments(positions, None, 1, 5, torch.device("cpu")).cu_seqlens.tolist() == [0, 3, 5]


def test_first_fit_decreasing_fills_bins():
    lengths = [7, 5, 4, 3, 3, 2, 1]
    bins = first_fit_decreasing(lengths, 8)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    assert len(bins) == 4  # 25 tokens need at least 4 bins of 8


def _toy(lengths):
    return [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in lengths]


@pytest.mark.parametrize("buffer_size", [1, 4, 64])
def test_every_sample_once_per_epoch_never_split(buffer_size):
    lengths = [(i * 37) % 29 + 1 for i in range(100)]
    samples = _toy(lengths)
    for i, s in enumerate(samples):
        s["input_ids"][0] = 1000 + i  # a tag to find each sample again
    dataset = PackedDataset(samples, 32, buffer_size=buffer_size, seed=3)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        seen = []
        for row in dataset:
            assert len(row["input_ids"]) <= 32
            starts = (row["position_ids"] == 0).nonzero().flatten().tolist() + [len(row["input_ids"])]
            for a, b in zip(starts, starts[1:]):
                tag = int(row["input_ids"][a]) - 1000
                assert b - a == lengths[tag]  # whole, never split
                seen.append(tag)
        assert sorted(seen) == list(range(100))
    total = sum(lengths)
    rows = sum(1 for _ in dataset)
    assert rows >= -(-total // 32)
    if buffer_size == 64:
        assert total / (rows * 32) > 0.9  # a real buffer packs tightly


def test_length_estimate_is_close():
    lengths = [(i * 37) % 29 + 1 for i in range(400)]
    dataset = PackedDataset(_toy(lengths), 32, buffer_size=64, seed=0, probe=128)
    actual = sum(1 for _ in dataset)
    assert abs(len(dataset) - actual) <= 0.1 * actual


def test_dropped_samples_are_skipped():
    samples = _toy([3, 4, 5])
    samples[1] = None  # truncation: drop
    rows = list(PackedDataset(samples, 16, seed=0))
    assert sum(len(r["input_ids"]) for r in rows) == 8


def test_samples_the_encoder_drops_are_left_out_not_replaced():
    """An EncodedDataset stands the next sample in for a dropped one; packed, that sample would train twice."""
    from vistune.data.encoded import EncodedDataset
    from vistune.templates import Sample

    class Encoder:
        def encode(self, sample):
            ids = [ord(c) for c in sample.messages[0]["content"]]
            return None if len(ids) > 3 else {"input_ids": ids, "labels": ids}  # truncation: drop

    texts = ["a", "too long", "b", "c"]
    records = [Sample([{"role": "user", "content": text}], source=f"s:{i}") for i, text in enumerate(texts)]
    encoded = EncodedDataset(records, Encoder())
    rows = list(PackedDataset(encoded, 16, shuffle=False))
    assert sorted(token for row in rows for token in row["input_ids"].tolist()) == [ord("a"), ord("b"), ord("c")]
    assert encoded.dropped == 1
    with pytest.raises(DataError, match="no sample of the dataset could be packed"):
        list(PackedDataset(EncodedDataset(records[1:2], Encoder()), 16))


def test_collate_tells_per_token_keys_by_each_rows_own_length():
    """A 1-D per-image tensor in one row is not taken for a token sequence because another row has its length."""
    text_only = make_row([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}])
    with_videos = make_row([{"input_ids": [8, 9], "labels": [8, 9], "second_per_grid_ts": torch.tensor([1.0, 0.5, 2.0])}])
    batch = collate_packed([text_only, with_videos], pad_to_multiple_of=1)
    assert batch["second_per_grid_ts"].tolist() == [1.0, 0.5, 2.0]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]


def test_sample_longer_than_a_row_is_an_error_naming_it():
    class Encoded(list):
        def source(self, index):
            return f"train.jsonl:{index + 1}"

    dataset = PackedDataset(Encoded(_toy([3, 40, 5])), 16, shuffle=False)
    with pytest.raises(DataError, match=r"sample 1 \(train.jsonl:2\) has 40 tokens.*max_packed_length \(16\)"):
        list(dataset)


def test_model_types_without_packing_are_refused(llava):
    from vistune.errors import VistuneError

    unsupported = ModelType("no-packing", loader="transformers:AutoModel", default_template="test")
    with pytest.raises(VistuneError, match="cannot isolate packed samples"):
        pack_dataset([], 64, llava, unsupported)


def test_trainer_keeps_packed_batches_whole(tmp_path):
    """accelerate's batch dispatching would slice the image tensors of a packed batch; vistune's arguments turn it off."""
    from accelerate.data_loader import DataLoaderDispatcher
    from transformers import Trainer
    from vistune.config import build_config
    from vistune.training.arguments import training_arguments

    class Tiny(torch.nn.Module):
        def forward(self, **batch):
            return {"loss": torch.zeros(())}

    samples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "pixel_values": torch.zeros(2, 3, 4, 4)}] * 4
    config = build_config({"task": "sft", "output_dir": str(tmp_path), "max_steps": 1, "packing": True}).config
    args = training_arguments(config, "cpu", has_eval=False, **trainer_overrides())
    trainer = Trainer(
        model=Tiny(), args=args, train_dataset=PackedDataset(samples, 6, seed=0), data_collator=collate_packed
    )
    loader = trainer.get_train_dataloader()
    assert not isinstance(loader, DataLoaderDispatcher)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape[0] == 4  # both samples' two images, none sliced away
