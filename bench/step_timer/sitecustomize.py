"""Per-step timings of any ``transformers.Trainer`` run, for the SFT benchmark (bench/sft_product.py).

Python imports ``sitecustomize`` at start-up from the path, so putting this folder on
``PYTHONPATH`` instruments every process of a run (``vistune sft``, a Trainer script,
TRL, ms-swift and the children they start) the same way, without touching their code.
Nothing happens unless ``SFT_BENCH_TIMINGS`` names a folder.  Then, when
``transformers.trainer`` is imported, every ``Trainer`` gets one more callback that

* synchronises the GPU at each step's begin and end, and records both times: the gap
  from the previous step's end to this step's begin is the time the loop waited for
  its batch, the rest is forward, backward and optimizer;
* counts the model's input tokens per step through a forward pre-hook on the trained
  model (``attention_mask`` ones, else every ``input_ids`` position);
* records the first logged loss, the peak allocated and peak reserved GPU memory,
  and, for vistune's RL trainer (``vistune rl``), the seconds of each step spent
  generating the rollouts (its ``_sample``, between two synchronisations); with
  ``SFT_BENCH_PROFILE=FIRST-LAST``, a torch profiler table of those steps;
* with ``SFT_BENCH_STOP_AFTER=N``, ends training after N steps, the way a Trainer
  ends at ``max_steps`` (each system is configured for a full-length run, so that
  what it decides from the run's length is what a user's run gets, and is stopped
  once it has been timed);

and writes ``<pid>.json`` into the folder when training ends.  The synchronisations
cost every system the same few microseconds per step.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import os
import sys
import time

TIMINGS_DIR = os.environ.get("SFT_BENCH_TIMINGS")


def _make_callback():
    import torch
    from transformers import TrainerCallback

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begins, self.ends, self.tokens = [], [], []
            self.generation_s, self._generating = [], 0.0
            self.first_loss = None
            self._counted = None
            self._hook = None
            self._profiler = None
            first, _, last = os.environ.get("SFT_BENCH_PROFILE", "").partition("-")
            self.profile = (int(first), int(last or first)) if first else None
            self.profile_table = None
            self.stop_after = int(os.environ.get("SFT_BENCH_STOP_AFTER", "0"))

        def _count(self, module, args, kwargs):
            if not module.training or not torch.is_grad_enabled():
                return
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids", args[0] if args else None)
            if mask is not None and mask.dim() == 2:
                n = mask.sum()
            elif ids is not None:
                n = torch.tensor(ids.numel(), device=ids.device)
            else:
                return
            self._counted = n if self._counted is None else self._counted + n

        def timed_generation(self, sample):
            """``sample`` (an RL trainer's rollout generation) adding its wall time to the current step's."""

            @functools.wraps(sample)
            def timed(*args, **kwargs):
                sync()
                start = time.perf_counter()
                try:
                    return sample(*args, **kwargs)
                finally:
                    sync()
                    self._generating += time.perf_counter() - start

            return timed

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
            sync()
            self.ends.append(time.perf_counter())  # the first "step end" is the start of training

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.begins.append(time.perf_counter())
            step = len(self.begins)
            if self.profile and step == self.profile[0]:
                self._profiler = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                )
                self._profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.ends.append(time.perf_counter())
            counted, self._counted = self._counted, None
            self.tokens.append(int(counted) if counted is not None else 0)
            self.generation_s.append(self._generating)
            self._generating = 0.0
            if self._profiler is not None and len(self.begins) == self.profile[1]:
                self._profiler.__exit__(None, None, None)
                averages = self._profiler.key_averages()
                try:
                    self.profile_table = averages.table(sort_by="self_device_time_total", row_limit=30)
                except Exception:  # noqa: BLE001 - older torch names it after CUDA
                    self.profile_table = averages.table(sort_by="self_cuda_time_total", row_limit=30)
                self._profiler = None
            if self.stop_after and len(self.tokens) >= self.stop_after:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.first_loss is None and logs and isinstance(logs.get("loss"), (int, float)):
                self.first_loss = float(logs["loss"])

        def on_train_end(self, args, state, control, **kwargs):
            if self._hook is not None:
                self._hook.remove()
            record = {
                "pid": os.getpid(),
                "argv": sys.argv,
                "step_begin_s": self.begins,
                "step_end_s": self.ends,
                "tokens": self.tokens,
                "generation_s": self.generation_s,
                "first_loss": self.first_loss,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0,
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
                "profile": self.profile_table,
            }
            os.makedirs(TIMINGS_DIR, exist_ok=True)
            with open(os.path.join(TIMINGS_DIR, f"{os.getpid()}.json"), "w") as f:
                json.dump(record, f)

    return StepTimer


def _instrument(module) -> None:
    trainer_class = module.Trainer
    original_init = trainer_class.__init__

    @functools.wraps(original_init)  # keeps the signature, which some trainers inspect
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        timer = _make_callback()()
        self.add_callback(timer)
        if callable(getattr(self, "_rollout", None)) and callable(getattr(self, "_sample", None)):
            # vistune's RLTrainer: the generation of its rollouts, timed apart
            self._sample = timer.timed_generation(self._sample)

    trainer_class.__init__ = __init__


class _TrainerImportHook(importlib.abc.MetaPathFinder):
    """Instruments ``transformers.trainer`` right after it is first imported."""

    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _instrument(module)

        spec.loader.exec_module = exec_module
        return spec


if TIMINGS_DIR:
    sys.meta_path.insert(0, _TrainerImportHook())
