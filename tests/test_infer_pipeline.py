"""``vistune infer``: predictions for a dataset, written as JSONL and scored.

Predictions are checked against plain ``transformers`` greedy generation, the scores
against ``nltk``'s ``sentence_bleu`` computed here from the written file.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("nltk")

from vistune.cli import main
from vistune.pipelines.infer import split_prompt
from vistune.templates import Sample


def greedy(tiny_llama, messages, max_new_tokens) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)[
            0, len(ids) :
        ].tolist()
    eos = set(model.generation_config.eos_token_id)
    out = out[: next((i for i, t in enumerate(out) if t in eos), len(out))]
    return tokenizer.decode(out, skip_special_tokens=True)


def write_config(path, **values) -> str:
    import yaml

    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_split_prompt_keeps_the_conversation_up_to_the_last_question():
    sample = Sample(
        [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "a circle"},
         {"role": "user", "content": "And its colour? <image>"}, {"role": "assistant", "content": "red"}],
        images=["a.png", "b.png"], columns={"id": 7}, source="data.jsonl:3",
    )  # fmt: skip
    prompt, reference = split_prompt(sample)
    assert [m["content"] for m in prompt.messages] == ["<image>\nWhat is it?", "a circle", "And its colour? <image>"]
    assert prompt.images == ["a.png", "b.png"] and reference == "red"
    caption_only = Sample(
        [{"role": "user", "content": "<image>\nDescribe."}], images=["a.png"], columns={"caption": "x"}
    )
    assert split_prompt(caption_only)[1] == "x"


def test_infer_writes_predictions_and_scores_them(tiny_llama, tmp_path, capsys):
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    first = [{"role": "user", "content": "What colour is the star?"}]
    model_answer = greedy(tiny_llama, first, 8)
    records = [
        {"messages": [*first, {"role": "assistant", "content": model_answer}], "id": "exact"},
        {"messages": [{"role": "user", "content": "Describe a red circle."}], "reference": "a red circle on the left"},
        {"messages": [{"role": "user", "content": "How many shapes are there?"}, {"role": "assistant", "content": "two"},
                      {"role": "user", "content": "Which is larger?"}, {"role": "assistant", "content": "the square"}]},
        {"messages": [{"role": "user", "content": "Say something."}]},
    ]  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = write_config(tmp_path / "infer.yaml", model=str(tiny_llama), dataset=str(data), device="cpu",
                          output_dir=str(tmp_path / "out"), metrics=["bleu", "exact_match"], max_new_tokens=8,
                          max_batch_size=2)  # fmt: skip
    assert main(["infer", "--config", config]) == 0
    progress = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any(line.startswith("infer: 100%") and "4/4" in line for line in progress), progress
    lines = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2, 3]
    for record, line in zip(records, lines):
        last_user = max(i for i, m in enumerate(record["messages"]) if m["role"] == "user")
        assert line["prediction"] == greedy(tiny_llama, record["messages"][: last_user + 1], 8)
    assert [line["reference"] for line in lines] == [model_answer, "a red circle on the left", "the square", None]
    assert lines[0]["columns"] == {"id": "exact"}
    for line in lines[:3]:
        expected = sentence_bleu([line["reference"].lower().split()], line["prediction"].lower().split(),
                                 smoothing_function=SmoothingFunction().method1)  # fmt: skip
        assert line["scores"]["bleu"] == pytest.approx(expected)
    assert [line["scores"]["exact_match"] for line in lines] == [1.0, 0.0, 0.0, None]
    assert lines[3]["scores"]["bleu"] is None
    summary = json.loads((tmp_path / "out" / "predictions.summary.json").read_text())
    assert summary["samples"] == 4
    assert summary["metrics"]["exact_match"] == pytest.approx(1 / 3)
    assert summary["metrics"]["bleu"] == pytest.approx(sum(line["scores"]["bleu"] for line in lines[:3]) / 3)
    assert summary["completion_tokens"] == sum(line["completion_tokens"] for line in lines)


def test_bad_records_stop_the_run_or_are_skipped(tiny_llama, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "system", "content": "no question"}]}) + "\n")  # fmt: skip
    common = {"model": str(tiny_llama), "dataset": str(data), "device": "cpu", "max_new_tokens": 4,
                  "output_file": str(tmp_path / "preds.jsonl")}  # fmt: skip
    assert main(["infer", "--config", write_config(tmp_path / "a.yaml", **common)]) == 2
    assert "no user message" in capsys.readouterr().err
    assert main(["infer", "--config", write_config(tmp_path / "b.yaml", on_bad_record="skip", **common)]) == 0
    assert len((tmp_path / "preds.jsonl").read_text().splitlines()) == 1
    summary = json.loads((tmp_path / "preds.summary.json").read_text())
    assert summary["samples"] == 1 and summary["failed"] == 1


def test_infer_a_vision_dataset_with_a_reward(tiny_llava, tmp_path, monkeypatch):
    pytest.importorskip("vistune_llava")
    pytest.importorskip("vistune_bleu_reward")
    monkeypatch.setenv("VISTUNE_CACHE_DIR", str(tmp_path / "cache"))
    config = write_config(tmp_path / "infer.yaml", model=str(tiny_llava), dataset="shapes-captions-eval", device="cpu",
                          max_samples=3, max_new_tokens=6, output_dir=str(tmp_path / "out"), rewards=["bleu"],
                          metrics=["bleu"])  # fmt: skip
    assert main(["infer", "--config", config]) == 0
    lines = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    assert all(line["prompt_tokens"] > 16 for line in lines)  # the image's tokens are in the prompt
    assert all(line["reference"].startswith("a ") for line in lines)
    summary = json.loads((tmp_path / "out" / "predictions.summary.json").read_text())
    assert set(summary["rewards"]) == {"bleu"} and set(summary["metrics"]) == {"bleu"}


FAILING_REWARDS = '''
import math

def broken(prompts, completions, **kwargs):
    raise RuntimeError("the judge is unreachable")

def first_nan(prompts, completions, **kwargs):
    return [math.nan] + [1.0] * (len(completions) - 1)

def length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]

def abstains(prompts, completions, **kwargs):
    return [None] * len(completions)
'''


def test_a_failing_reward_is_an_error_named_in_the_summary(tiny_llama, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {word}."}]}) + "\n"
                            for word in ("one", "two")))  # fmt: skip
    rewards_file = tmp_path / "my_rewards.py"
    rewards_file.write_text(FAILING_REWARDS)
    rewards = [f"{rewards_file}:{name}" for name in ("broken", "first_nan", "length", "abstains")]
    config = write_config(tmp_path / "infer.yaml", model=str(tiny_llama), dataset=str(data), device="cpu",
                          max_new_tokens=4, output_dir=str(tmp_path / "out"), metrics=["exact_match"],
                          rewards=rewards)  # fmt: skip
    assert main(["infer", "--config", config]) == 2
    captured = capsys.readouterr()
    out = captured.out
    assert f"  my_rewards:broken: FAILED on 2 of 2 sample(s): raised RuntimeError: the judge is unreachable (at " \
           f"{rewards_file}:5) (sample {data}:1)" in out  # fmt: skip
    assert f"  my_rewards:first_nan: FAILED on 1 of 2 sample(s) (1.0000 over the others): returned nan, which is not " \
           f"a finite number or None (sample {data}:1)" in out  # fmt: skip
    assert "  exact_match: n/a (no references)" in out  # a metric without references is not an error
    assert "  my_rewards:abstains: n/a (it scored no sample)" in out  # nor a reward that applies to nothing
    assert "  my_rewards:length: 1" in out and out.count("n/a (no references)") == 1
    err = captured.err.splitlines()
    assert err[-2] == (f"error: reward 'my_rewards:broken' failed on 2 of 2 sample(s) (and 1 other reward(s)); first "
                       f"error: raised RuntimeError: the judge is unreachable (at {rewards_file}:5) (sample {data}:1)")
    # what did work is written all the same
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["scores"]["my_rewards:broken"] is None
    summary = json.loads((tmp_path / "out" / "predictions.summary.json").read_text())
    assert summary["reward_errors"]["my_rewards:broken"]["samples"] == 2
    assert summary["reward_errors"]["my_rewards:first_nan"] == {
        "samples": 1, "first_error": f"returned nan, which is not a finite number or None (sample {data}:1)"}  # fmt: skip
    assert set(summary["reward_errors"]) == {"my_rewards:broken", "my_rewards:first_nan"}
