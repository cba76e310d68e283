"""Training metrics: a progress bar, ``metrics.jsonl``, TensorBoard and a loss-curve PNG.

:class:`MetricsCallback` is a ``transformers.TrainerCallback``; any trainer built on
``transformers.Trainer`` (the sft pipeline, TRL's trainers in the rl pipeline) can use
it.  Every numeric value the trainer logs is recorded; the standard ones get short
names (``learning_rate`` -> ``lr``), the rest (``eval_loss``, rewards, KL...) keep theirs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
TENSORBOARD_DIR = "tensorboard"

#: Trainer log key -> name in metrics.jsonl.
RENAMED = {"learning_rate": "lr"}
#: Keys the record builds itself or that only repeat the state.
SKIPPED = {"num_input_tokens_seen", "step"}
#: Running averages since the start, which the Trainer adds to every step's log; a
#: step record has its own tokens_per_s, and the end-of-training record keeps them.
RUNNING = {"train_runtime", "train_tokens_per_second"}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (missing file: none)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(records: list[dict[str, Any]], path: str | Path, title: str = "training loss") -> Path | None:
    """Save loss (and eval_loss) against step as a PNG; None when nothing was logged."""
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["eval_loss"]) for r in records if isinstance(r.get("eval_loss"), (int, float))]
    if not train and not evals:
        return None
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


class MetricsCallback(TrainerCallback):
    """Record every log of a run.

    :param output_dir: where ``metrics.jsonl``, ``loss_curve.png`` and ``tensorboard/`` go.
    :param report_to: sinks among ``jsonl`` and ``tensorboard``.
    :param progress: show a tqdm bar with loss, learning rate and tokens/s.

    Only the main process writes, except that in a distributed run every other
    process records its own view in ``metrics.rank<N>.jsonl`` (losses are averaged
    over processes, so the files must agree).  On resume the records after the
    checkpoint's step are dropped, since those steps are trained again.
    """

    def __init__(
        self, output_dir: str | Path, report_to: list[str] | tuple[str, ...] = ("jsonl",), progress: bool = True
    ):
        self.output_dir = Path(output_dir)
        self.report_to = tuple(report_to)
        self.progress = progress
        self._file = None
        self._writer = None
        self._bar = None
        self._last_time = 0.0
        self._last_tokens = 0
        self._main = True
        #: Every record of the run so far (this process's view).
        self.records: list[dict[str, Any]] = []

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_FILE

    def _path_for(self, rank: int) -> Path:
        return self.metrics_path if self._main else self.output_dir / f"metrics.rank{rank}.jsonl"

    # -- callback events -----------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self._main = state.is_world_process_zero
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self._path_for(args.process_index)
        self.records = (
            [r for r in read_metrics(path) if r.get("step", 0) <= state.global_step] if state.global_step else []
        )
        if "jsonl" in self.report_to or not self._main:
            self._file = path.open("w")
            for record in self.records:
                self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._main and "tensorboard" in self.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(
                log_dir=str(self.output_dir / TENSORBOARD_DIR), purge_step=state.global_step or None
            )
        if self._main and self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self._bar is not None:
            self._bar.update(state.global_step - self._bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        record = self.make_record(state, logs or {})
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key if "/" in key else f"train/{key}", value, record["step"])
            self._writer.flush()
        if self._bar is not None and "loss" in record:
            postfix = {"loss": f"{record['loss']:.4f}", "lr": f"{record.get('lr', 0):.2e}"}
            if record.get("tokens_per_s") is not None:
                postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
            if isinstance(record.get("reward"), (int, float)):  # RL: the mean reward of the step's rollouts
                postfix["reward"] = f"{record['reward']:.3f}"
            self._bar.set_postfix(postfix, refresh=False)

    def on_evaluate(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()  # tokens/s measures training, not evaluation

    def on_save(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()  # nor checkpointing

    def on_train_end(self, args, state, control, **kwargs):
        if self._bar is not None:
            self._bar.update(state.global_step - self._bar.n)
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._main:
            plot_loss_curve(self.records, self.output_dir / LOSS_CURVE_FILE)

    # -- records -----------------------------------------------------------------

    def make_record(self, state, logs: dict[str, Any]) -> dict[str, Any]:
        """``{"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", ...}`` for one log."""
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen
        record: dict[str, Any] = {"step": state.global_step}
        if state.epoch is not None:
            record["epoch"] = round(float(state.epoch), 6)
        for key, value in logs.items():
            if key in SKIPPED or key == "epoch" or (key in RUNNING and "loss" in logs):
                continue
            if hasattr(value, "item"):
                value = value.item()
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            if isinstance(value, (int, float, str, type(None))):
                record[RENAMED.get(key, key)] = value
        if "loss" in logs:
            elapsed = now - self._last_time
            record["tokens"] = tokens
            record["tokens_per_s"] = (tokens - self._last_tokens) / elapsed if elapsed > 0 and tokens else None
            self._last_time, self._last_tokens = now, tokens
        return record
