"""Sequential ``generate``: the baseline row of bench/serve_http.py.

A plain transformers script, as the model card writes inference: the processor's chat
template and ``model.generate``, one request after the other, greedy, with a streamer
that notes when each new token is ready (it copies the token to the CPU, so the time is
after the GPU has produced it).  ``min_new_tokens`` equal to ``max_new_tokens`` keeps
end-of-sequence from cutting an answer short.  Times are seconds from the start of each
request's preprocessing (the image is read and processed inside the timed part, as a
server does).

Writes ``{"cells": [{"new_tokens", "wall_s", "requests": [{"token_times", "latency",
"prompt_tokens"}]}]}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


class TokenTimes:
    """A ``generate`` streamer noting when each new token arrives (the first ``put`` is the prompt)."""

    def __init__(self, start: float):
        self.start = start
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        value.cpu()  # waits for the device
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter() - self.start)

    def end(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local Hugging Face checkpoint directory")
    parser.add_argument("--prompts", required=True, help="JSONL of {image, text}")
    parser.add_argument("--new-tokens", default="64,256")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu", action="store_true", help="float32 on CPU (smoke test)")
    args = parser.parse_args()

    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = "cpu" if args.cpu else "cuda"
    dtype = torch.float32 if args.cpu else torch.bfloat16
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa",
                                                        device_map=device)  # fmt: skip
    model.eval()
    processor = AutoProcessor.from_pretrained(args.model)
    prompts = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]

    def answer(prompt: dict, new_tokens: int) -> dict:
        start = time.perf_counter()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt["text"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        image = Image.open(prompt["image"]).convert("RGB")
        inputs = processor(images=image, text=text, return_tensors="pt").to(device, dtype)
        streamer = TokenTimes(start)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           streamer=streamer)  # fmt: skip
        return {"token_times": streamer.times, "latency": time.perf_counter() - start,
                "prompt_tokens": int(inputs["input_ids"].shape[1])}  # fmt: skip

    sizes = [int(n) for n in args.new_tokens.split(",")]
    for i in range(args.warmup):
        answer(prompts[i % len(prompts)], min(16, max(sizes)))
    cells = []
    for new_tokens in sizes:
        start = time.perf_counter()
        requests = [answer(prompt, new_tokens) for prompt in prompts]
        cells.append({"new_tokens": new_tokens, "wall_s": time.perf_counter() - start, "requests": requests})
        print(f"new_tokens {new_tokens}: {len(requests)} requests in {cells[-1]['wall_s']:.2f} s", flush=True)
    Path(args.out).write_text(json.dumps({"cells": cells}) + "\n")


if __name__ == "__main__":
    main()
