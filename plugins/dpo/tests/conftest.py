"""Shared by the preference plugin's tests: a tiny Llava whose answers end with ``</s>``, pairs of shapes, trainers."""

from __future__ import annotations

import random
import shutil

import pytest

#: Vicuna turns as LLaVA was trained on them: ``<s>`` first, every answer ends with ``</s>`` and nothing follows
#: it, so the tokens TRL counts as the completion and those vistune's template labels are the same (and TRL's
#: text trainers, which add a BOS where there is none, see the same sequence).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + '</s>' }}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: (colour, shape, wrong caption) of the test pairs.
PAIRS = [("red", "circle", "a blue circle"), ("green", "square", "a green cross"),
         ("blue", "triangle", "a red triangle"), ("yellow", "cross", "a yellow circle")]  # fmt: skip


@pytest.fixture(scope="session")
def llava_eos(tiny_llava, tmp_path_factory):
    """The tiny Llava with a chat template whose answers end with ``</s>``."""
    directory = tmp_path_factory.mktemp("llava-eos") / "llava"
    shutil.copytree(tiny_llava, directory)
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return directory


@pytest.fixture(scope="session")
def shape_pairs(tmp_path_factory):
    """``(directory, records)``: four preference pairs about generated shapes, their images in ``images/``."""
    from vistune.demo.shapes import draw_shape

    directory = tmp_path_factory.mktemp("pairs")
    (directory / "images").mkdir()
    rng = random.Random(0)
    records = []
    for i, (colour, shape, wrong) in enumerate(PAIRS):
        draw_shape(colour, shape, rng).save(directory / "images" / f"{i}.png")
        records.append({"prompt": [{"role": "user", "content": "What is in the picture?"}],
                        "chosen": [{"role": "assistant", "content": f"a {colour} {shape}"}],
                        "rejected": [{"role": "assistant", "content": wrong}],
                        "images": [f"images/{i}.png"]})  # fmt: skip
    return directory, records
