"""``vistune infer``: answer every prompt of a dataset, write them as JSONL, score them.

For each record the prompt is the conversation up to its last user message (with the
images that message and the earlier ones show); the reference is the assistant answer
that follows it, else a ``reference`` / ``references`` / ``caption`` / ``answer``
column.  Predictions are written as they are produced, one JSON object per line, so an
interrupted run keeps what it did.  ``metrics`` (bleu, exact_match) and ``rewards``
score each prediction; the summary (means, token counts, throughput) is printed and
saved next to the predictions as ``<name>.summary.json``.  A reward that raised or gave
a score that is not a number, on any sample, is an error: the summary names it, with
how many samples it failed on and its first error, and the command exits non-zero
(:class:`vistune.rl.rewards.RewardError`) once the predictions and summary are written.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from vistune.errors import DataError, VistuneError
from vistune.outputs import prepare_output_dir
from vistune.plan import Plan
from vistune.templates import IMAGE_TAG, Sample

REFERENCE_COLUMNS = ("reference", "references", "caption", "answer")
#: Requests handed to the engine at once (it batches them; this only paces the progress bar).
CHUNK_BATCHES = 4


@attrs.define
class InferItem:
    """One dataset record prepared for generation."""

    index: int
    prompt: Sample
    reference: Any


def split_prompt(sample: Sample) -> tuple[Sample, Any]:
    """The conversation up to its last user message, and the reference answer.

    :raises DataError: for a conversation without a user message.
    """
    messages = sample.messages
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        raise DataError(f"{sample.source or 'a sample'}: no user message to answer")
    prompt_messages = [dict(m) for m in messages[: last_user + 1]]
    tags = sum(m["content"].count(IMAGE_TAG) for m in prompt_messages)
    reference = next((m["content"] for m in messages[last_user + 1 :] if m.get("role") == "assistant"), None)
    if reference is None:
        reference = next((sample.columns[c] for c in REFERENCE_COLUMNS if sample.columns.get(c) is not None), None)
    prompt = Sample(prompt_messages, list(sample.images[:tags]), dict(sample.columns), sample.source)
    return prompt, reference


def _items(dataset: Any) -> Iterator[InferItem | DataError | None]:
    for index in range(len(dataset)):
        try:
            sample = dataset.get(index)
            if sample is None:  # a bad record, skipped and counted by the reader
                yield None
                continue
            prompt, reference = split_prompt(sample)
        except DataError as exc:
            yield exc
            continue
        yield InferItem(index, prompt, reference)


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _sampling(config: Any, index: int):
    from vistune.inference import SamplingParams

    temperature = 0.0 if config.temperature is None else config.temperature
    return SamplingParams(max_tokens=config.max_new_tokens, temperature=temperature, top_p=config.top_p,
                          seed=config.seed + index)  # fmt: skip


def _generate(engine: Any, items: list[InferItem], config: Any) -> list[Any]:
    """Results per item; with ``on_bad_record: skip`` a refused item gets its error instead."""
    from vistune.inference import GenerationRequest

    requests = [GenerationRequest(item.prompt, _sampling(config, item.index)) for item in items]
    try:
        return engine.generate(requests)
    except VistuneError:
        if config.on_bad_record != "skip":
            raise
    out: list[Any] = []
    for request in requests:  # find the bad ones, keep the rest
        try:
            out.append(engine.generate([request])[0])
        except VistuneError as exc:
            out.append(exc)
    return out


def output_path(config: Any) -> Path:
    return Path(config.output_file) if config.output_file else Path(config.output_dir) / "predictions.jsonl"


def _output_where(plan: Plan) -> str:
    """What names the predictions' directory in an error: the config line and field that set it."""
    field = "output_file" if plan.config.output_file else "output_dir"
    return f"{plan.loaded.where(field)}: {field}"


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def _scorer(plan: Plan):
    if not plan.rewards:
        return None
    from vistune.plugins import get_plugin_manager
    from vistune.rl.rewards import RewardScorer, load_rewards

    return RewardScorer(load_rewards(plan.rewards, get_plugin_manager()), error_policy="skip")


def _reward_scores(scorer: Any, items: Sequence[InferItem], predictions: Sequence[str]) -> dict[str, list]:
    keys = sorted({k for item in items for k in item.prompt.columns})
    columns = {k: [item.prompt.columns.get(k) for item in items] for k in keys}
    columns["answer"] = [item.reference for item in items]
    columns["images"] = [item.prompt.images for item in items]
    prompts = [item.prompt.messages for item in items]
    return scorer.score(prompts, list(predictions), columns, [item.prompt.source for item in items])


def run(plan: Plan) -> dict[str, Any]:
    """Generate, write and score predictions for the plan's dataset; returns the summary."""
    from tqdm.auto import tqdm

    from vistune.data.validation import read_validated
    from vistune.inference import metrics as metric_functions
    from vistune.inference.backends import create_engine
    from vistune.inference.batch_size import batch_size_of
    from vistune.pipelines.sft import ensure_built

    config = plan.config
    metric_functions.check_metrics(config.metrics)
    ensure_built(plan.dataset)
    dataset = read_validated(plan.dataset, config)  # every record checked before the engine starts
    scorer = _scorer(plan)
    path = output_path(config)
    prepare_output_dir(path.parent, _output_where(plan))  # before the model loads
    engine = create_engine(plan)
    totals: dict[str, Any] = {"samples": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0}
    metric_values: dict[str, list[float]] = {name: [] for name in config.metrics}
    reward_values: dict[str, list[float]] = {}
    started = time.monotonic()
    try:
        with path.open("w") as out, tqdm(total=len(dataset), unit="sample", desc="infer", mininterval=1) as bar:
            for chunk in _chunks(_items(dataset), batch_size_of(engine, config) * CHUNK_BATCHES):
                bad = [x for x in chunk if isinstance(x, DataError)]
                if bad and config.on_bad_record != "skip":
                    raise bad[0]
                items = [x for x in chunk if isinstance(x, InferItem)]
                totals["failed"] += len(bad)
                results = _generate(engine, items, config) if items else []
                good = [(item, result) for item, result in zip(items, results) if not isinstance(result, Exception)]
                totals["failed"] += len(items) - len(good)
                predictions = [result.text for _, result in good]
                scores = metric_functions.score(config.metrics, predictions, [item.reference for item, _ in good])
                rewards = _reward_scores(scorer, [item for item, _ in good], predictions) if scorer and good else {}
                for k, (item, result) in enumerate(good):
                    record = {
                        "index": item.index,
                        "source": item.prompt.source,
                        "prompt": item.prompt.messages,
                        "prediction": result.text,
                        "reference": item.reference,
                        "finish_reason": result.outputs[0].finish_reason,
                        "prompt_tokens": result.prompt_tokens,
                        "completion_tokens": result.completion_tokens,
                    }
                    record["scores"] = {name: scores[name][k] for name in config.metrics}
                    record["scores"] |= {name: values[k] for name, values in rewards.items()}
                    columns = {key: _json_safe(v) for key, v in item.prompt.columns.items()}
                    if columns:
                        record["columns"] = columns
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    totals["prompt_tokens"] += result.prompt_tokens
                    totals["completion_tokens"] += result.completion_tokens
                out.flush()
                for name in config.metrics:
                    metric_values[name] += [s for s in scores[name] if s is not None]
                for name, values in rewards.items():
                    reward_values.setdefault(name, []).extend(v for v in values if v is not None)
                totals["samples"] += len(good)
                bar.update(len(chunk))
    finally:
        engine.close()
    seconds = time.monotonic() - started
    summary = {
        **totals,
        "skipped_records": dataset.skipped,
        "output_file": str(path),
        "metrics": {name: (sum(v) / len(v) if v else None) for name, v in metric_values.items()},
        "rewards": {name: (sum(v) / len(v) if v else None) for name, v in reward_values.items()},
        "reward_errors": _reward_errors(scorer),
        "seconds": round(seconds, 3),
        "samples_per_second": round(totals["samples"] / seconds, 3) if seconds > 0 else None,
        "completion_tokens_per_second": round(totals["completion_tokens"] / seconds, 1) if seconds > 0 else None,
    }
    summary_path = path.with_name(path.stem + ".summary.json")
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, summary_path)
    _raise_for_reward_errors(summary)
    return summary


def _reward_errors(scorer: Any) -> dict[str, dict[str, Any]]:
    """Reward name -> ``{"samples": how many it failed on, "first_error": ...}``, for the rewards that failed."""
    if scorer is None:
        return {}
    return {name: {"samples": record.samples, "first_error": record.first_error}
            for name, record in scorer.failures.items() if record.samples}  # fmt: skip


def _raise_for_reward_errors(summary: dict[str, Any]) -> None:
    """Exit non-zero for a failed reward: its scores are missing, which a mean over the rest would hide."""
    from vistune.rl.rewards import RewardError

    failed = summary["reward_errors"]
    if not failed:
        return
    name, first = next(iter(failed.items()))
    others = f" (and {len(failed) - 1} other reward(s))" if len(failed) > 1 else ""
    raise RewardError(
        f"reward {name!r} failed on {first['samples']} of {summary['samples']} sample(s){others}; first error: "
        f"{first['first_error']}",
        hint=f"fix the reward; the predictions and the scores that did work are in {summary['output_file']}",
    )


def _print_summary(summary: dict[str, Any], summary_path: Path) -> None:
    lines = [f"vistune infer: {summary['samples']} predictions -> {summary['output_file']}"]
    if summary["failed"] or summary["skipped_records"]:
        lines.append(f"  skipped: {summary['skipped_records']} bad record(s), {summary['failed']} refused prompt(s)")
    for name, value in summary["metrics"].items():
        lines.append(f"  {name}: {'n/a (no references)' if value is None else f'{value:.4f}'}")
    for name, value in summary["rewards"].items():
        lines.append(f"  {name}: {_reward_line(value, summary['reward_errors'].get(name), summary['samples'])}")
    lines.append(f"  {summary['samples_per_second']} samples/s, {summary['completion_tokens_per_second']} tokens/s "
                 f"({summary['completion_tokens']} generated in {summary['seconds']} s)")  # fmt: skip
    lines.append(f"  summary: {summary_path}")
    print("\n".join(lines), file=sys.stdout, flush=True)


def _reward_line(mean: float | None, failed: dict[str, Any] | None, samples: int) -> str:
    """A reward's summary: its mean, and what went wrong when it failed on some samples."""
    shown = "n/a (it scored no sample)" if mean is None else f"{mean:.4f}"
    if failed is None:
        return shown
    over = "" if mean is None else f" ({shown} over the others)"
    return f"FAILED on {failed['samples']} of {samples} sample(s){over}: {failed['first_error']}"
