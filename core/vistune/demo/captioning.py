"""Greedy captions for held-out samples, scored by exact match against their reference."""

from __future__ import annotations

from typing import Any

from vistune.templates import Sample


def prompt_and_reference(sample: Sample) -> tuple[Sample, str]:
    """The conversation up to its last assistant answer, and that answer."""
    last = max(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
    prompt = Sample(messages=sample.messages[:last], images=sample.images, columns=sample.columns, source=sample.source)
    return prompt, sample.messages[last]["content"]


def caption_samples(model: Any, encoder: Any, samples: list[Sample], max_new_tokens: int = 16) -> list[dict[str, Any]]:
    """Generate greedily for each sample's prompt; one ``{"reference", "prediction", "correct", "source"}`` per sample."""
    import torch

    from vistune.data.collate import Collator

    collate = Collator(pad_token_id=0)  # one sample per batch: nothing is padded
    model.eval()
    results = []
    with torch.no_grad():
        for sample in samples:
            prompt, reference = prompt_and_reference(sample)
            inputs = collate([encoder.encode_prompt(prompt)])
            inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            prediction = encoder.decode(output[0, inputs["input_ids"].shape[1] :].tolist()).strip()
            results.append({"reference": reference, "prediction": prediction, "correct": prediction == reference.strip(),
                            "source": sample.source})  # fmt: skip
    return results
