"""A tiny Llava in vLLM, against plain ``transformers``: the image path of the vLLM engine.

vLLM's Llava needs a working torchvision, which the CPU build of torch lacks (its wheels are
CUDA builds); this module is skipped unless torchvision imports, except under
``VISTUNE_VLLM_LLAVA_REQUIRED=1``, which ``make test-vllm`` (so CI) sets once it has swapped in
PyPI's CUDA build of torch with its torchvision (they run on CPU): there a missing torchvision fails.  vLLM reads the CLIP tower's
weights under ``vision_tower.vision_model.*``, while transformers 5 saves ``vision_tower.*``:
the test gives vLLM a copy of the checkpoint with those keys renamed.
"""

from __future__ import annotations

import os
import shutil

import pytest

if os.environ.get("VISTUNE_VLLM_LLAVA_REQUIRED") == "1":  # `make test-vllm` after its torchvision swap: no skipping
    import torchvision  # noqa: F401
    import vllm  # noqa: F401
    from torchvision.transforms import v2  # noqa: F401
pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
pytest.importorskip("vistune_llava")
try:
    import torchvision  # noqa: F401
    from torchvision.transforms import v2  # noqa: F401
except Exception as exc:  # noqa: BLE001 - a CUDA torchvision next to the CPU torch fails on import
    pytest.skip(f"vLLM's Llava needs a working torchvision ({exc})", allow_module_level=True)

from PIL import Image
from vistune.config import RunConfig
from vistune.inference import GenerationRequest, SamplingParams
from vistune.templates import Sample


def vllm_layout_copy(source, target):
    """The checkpoint with its CLIP keys where vLLM looks for them (``vision_tower.vision_model.*``)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(str(source / "model.safetensors"))
    renamed = {}
    for key, value in weights.items():
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key[len("vision_tower.") :]
        renamed[key] = value
    save_file(renamed, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def engine(tiny_llava, tmp_path_factory):
    from vistune.plugins import get_plugin_manager
    from vistune_vllm.engine import VllmEngine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    path = vllm_layout_copy(tiny_llava, tmp_path_factory.mktemp("llava") / "model")
    config = RunConfig(task="infer", device="cpu", dtype="float32", max_length=256)
    engine = VllmEngine(str(path), get_plugin_manager().registries.models.get("llava"), config)
    yield engine
    engine.close()


def test_image_prompts_equal_transformers(engine, tiny_llava):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_llava).eval()
    images = [Image.new("RGB", (32, 32), (220, 30, 30)), Image.new("RGB", (48, 40), (30, 60, 220))]
    samples = [Sample([{"role": "user", "content": "<image>\nWhat is in the picture?"}], [images[0]]),
               Sample([{"role": "user", "content": "<image>\nDescribe it in detail, please."}], [images[1]]),
               Sample([{"role": "user", "content": "What colour is the sky?"}])]  # fmt: skip
    results = engine.generate([GenerationRequest(s, SamplingParams(max_tokens=12)) for s in samples])
    for sample, result in zip(samples, results):
        inputs = engine.encoder.encode_prompt(sample)
        kwargs = {k: torch.tensor([v]) if isinstance(v, list) else v for k, v in inputs.items()}
        with torch.inference_mode():
            out = model.generate(**kwargs, max_new_tokens=12, do_sample=False)[0, len(inputs["input_ids"]) :].tolist()
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        expected = out[: next((i + 1 for i, t in enumerate(out) if t in eos), len(out))]
        assert result.outputs[0].token_ids == expected
        assert result.prompt_tokens == len(inputs["input_ids"])
    print("\nvLLM Llava vs transformers greedy: 3 prompts (2 with images) x 12 tokens, token for token equal")
