"""The RL training loop: rollouts, rewards, group selection, advantages and the algorithm's loss.

:class:`RLTrainer` is vistune's ``transformers.Trainer`` (atomic checkpoints, per-part
learning rates, resume, DDP through accelerate, callbacks) with one training step
replaced.  (FSDP is not supported: the rollout engine needs the whole weights in each
process.)  Each step takes a batch of prompts from the dataloader and:

1. samples ``num_generations`` completions per prompt through the inference engine
   (:mod:`vistune.rl.rollout`);
2. scores them with every reward (:mod:`vistune.rl.rewards`), fires
   ``vistune_rollout_scored``, and combines the scores into one reward per completion;
3. computes, when the algorithm needs them, the completions' log-probabilities under the
   reference model and under the sampling policy;
4. lets the algorithm shape the rewards and select the groups to keep; when it drops
   groups and asks for a refill (DAPO's dynamic sampling), more prompts are drawn from
   the dataset and sampled, up to ``max_sampling_rounds`` rounds;
5. lets the algorithm turn the kept groups' rewards into advantages, and its loss into
   gradients.

With ``num_iterations`` mu > 1 each rollout batch is trained on for mu optimizer steps:
the sampler repeats each window of prompts mu times, and the stored rollouts (with their
sampling-time log-probabilities) are reused instead of sampling again.

Everything the step measures is logged, averaged over the steps between two logs and
over processes (``/max`` and ``/min`` metrics take the extremes, ``reward_errors/<name>``
is summed): ``reward``, ``reward_std``, ``reward/<name>``, ``reward_shaped`` (when the
algorithm shapes rewards), ``completion_length/{mean,min,max}``, ``completion_truncated``,
``filtered_groups``, ``sampling_rounds``, ``kl``, ``clip_fraction/{low,high,region}`` and
``importance_ratio``.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from vistune.rl.algorithm import PolicyBatch, RolloutStats
from vistune.rl.objectives import k3_kl, masked_average
from vistune.rl.rewards import RewardScorer, combine
from vistune.rl.rollout import Group, completion_logps, generate_groups, make_engine, policy_inputs
from vistune.training.trainer import VistuneTrainer

__all__ = ["RLTrainer", "RepeatingSampler"]

#: Metrics summed (not averaged) between two logs.
_SUMMED_PREFIXES = ("reward_errors/",)


def _reduction(key: str) -> str:
    """How a metric combines over steps and processes: mean, sum, max or min."""
    if key.startswith(_SUMMED_PREFIXES):
        return "sum"
    if key.endswith("/max"):
        return "max"
    if key.endswith("/min"):
        return "min"
    return "mean"


def _combine(key: str, values: Sequence[float]) -> float:
    """Values of one metric combined over steps or processes: the extreme for ``/max`` and ``/min``
    metrics, else the sum (which a mean divides by the count)."""
    if not values:
        return 0.0
    how = _reduction(key)
    return max(values) if how == "max" else min(values) if how == "min" else sum(values)


class RepeatingSampler:
    """Random order over the dataset in which each window of ``window`` indices comes ``repeat`` times.

    The window is the prompts of one optimizer step over all processes, so with
    ``num_iterations`` mu every process sees the same prompts for mu steps in a row.
    The last window is filled up from the start of the epoch's order: the trainer tells
    a repeat from new prompts by counting micro-batches, so every window must be whole.
    """

    def __init__(self, size: int, window: int, repeat: int, seed: int):
        self.size, self.window, self.repeat, self.seed = size, window, repeat, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = list(range(self.size))
        random.Random(self.seed + self.epoch).shuffle(order)
        order = list(itertools.islice(itertools.cycle(order), len(self) // self.repeat))
        for start in range(0, len(order), self.window):
            block = order[start : start + self.window]
            for _ in range(self.repeat):
                yield from block

    def __len__(self) -> int:
        return math.ceil(self.size / self.window) * self.window * self.repeat


def _collate_prompts(batch: Sequence[Any]) -> list[Any]:
    return list(batch)


class RLTrainer(VistuneTrainer):
    """A Trainer whose step is a group-relative policy-gradient update.

    :param algorithm: the :class:`vistune.rl.algorithm.RLAlgorithm`.
    :param scorer: the run's :class:`vistune.rl.rewards.RewardScorer`.
    :param encoder: the template's encoder (prompts for generation and scoring).
    :param backend: the plan's :class:`vistune.specs.Backend` (None: transformers).
    :param ref_model: a frozen reference model, when the reference is not the policy
        with its adapter disabled (full fine-tuning); None otherwise.
    :param ref_adapter: name of a frozen peft adapter holding the reference (a run that
        continues an SFT adapter); None to disable adapters for the reference.
    Other arguments are :class:`vistune.training.trainer.VistuneTrainer`'s; the training
    dataset yields prompt :class:`vistune.templates.Sample` objects.
    """

    def __init__(
        self,
        *args: Any,
        algorithm: Any,
        scorer: RewardScorer,
        encoder: Any,
        backend: Any = None,
        ref_model: Any = None,
        ref_adapter: str | None = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("data_collator", _collate_prompts)
        super().__init__(*args, **kwargs)
        config = self.vistune_config
        self.algorithm = algorithm
        self.scorer = scorer
        self.encoder = encoder
        self.backend = backend
        self.ref_model = ref_model
        self.ref_adapter = ref_adapter
        self.num_generations = config.num_generations
        self.max_completion_length = config.max_completion_length
        self.temperature = 1.0 if config.temperature is None else float(config.temperature)
        self.num_iterations = algorithm.num_iterations
        self._engine = None
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._buffer: dict[int, list[Group]] = {}
        self._micro_steps = 0
        self._rollouts = 0
        self._refill: Iterator[Any] | None = None
        tokenizer = getattr(self.processing_class, "tokenizer", None) or self.processing_class
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)

    # -- data ----------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        if self.num_iterations == 1:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        window = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return RepeatingSampler(len(dataset), window, self.num_iterations, self.args.seed)

    def _more_prompts(self, count: int) -> list[Any]:
        """``count`` further prompts for dynamic sampling, from an endless shuffled pass over the dataset."""
        if self._refill is None:

            def endless():
                # an order of its own, not the sampler's, and different in each process
                rng = random.Random(self.args.seed * 7919 + self.args.process_index)
                while True:
                    order = list(range(len(self.train_dataset)))
                    rng.shuffle(order)
                    for index in order:
                        yield self.train_dataset[index]

            self._refill = endless()
        return [next(self._refill) for _ in range(count)]

    # -- the step ----------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One micro-batch: new rollouts (or the stored ones, on a repeat step), then the algorithm's loss
        in as many forward and backward passes as the memory holds (see :mod:`vistune.rl.loss_passes`)."""
        model.train()  # log-probabilities in the mode the loss is computed in, as TRL does
        # micro-batches come in cycles of accumulation x mu: the first optimizer step's micro-batches sample new
        # rollouts, the repeats of the same prompts reuse them (a resumed run has none stored, so it samples)
        accumulation = self.args.gradient_accumulation_steps
        position = self._micro_steps % (accumulation * self.num_iterations)
        self._micro_steps += 1
        slot = position % accumulation
        if position < accumulation or slot not in self._buffer:
            self._buffer[slot] = self._rollout(list(inputs))
        groups = self._buffer[slot]

        unwrapped = self.accelerator.unwrap_model(model)
        passes = self._loss_passes(unwrapped, groups)
        inputs_per_pass = [policy_inputs(part, self.pad_id, unwrapped) for part in passes]
        masks = [inputs["completion_mask"] for inputs in inputs_per_pass]
        # every pass is normalised over the whole micro-batch (see PolicyBatch), so the passes' losses
        # and gradients add up to one pass's; dividing by the accumulation steps averages the micro-batches'
        num_sequences = sum(int(mask.shape[0]) for mask in masks)
        num_tokens = int(sum(mask.sum().item() for mask in masks))
        total = None
        metrics: dict[str, float] = defaultdict(float)
        for i, (part, policy, mask) in enumerate(zip(passes, inputs_per_pass, masks)):
            # gradients are synchronised across processes once, in the last pass: processes may make
            # different numbers of passes (each sizes them from its own free memory)
            with nullcontext() if i == len(passes) - 1 else self.accelerator.no_sync(model):
                loss = self._pass_loss(model, part, policy, mask, num_sequences, num_tokens, metrics,
                                       share=1.0 if len(passes) == 1 else float(mask.sum()) / max(num_tokens, 1))  # fmt: skip
                self.accelerator.backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
        for key, value in metrics.items():
            self._metrics[key].append(value)
        return total

    def _pass_loss(self, model: Any, part: list[Group], policy: dict[str, Any], mask: Any, num_sequences: int,
                   num_tokens: int, metrics: dict[str, float], share: float) -> Any:  # fmt: skip
        """The algorithm's loss of one pass, normalised over the micro-batch's ``num_sequences`` and
        ``num_tokens``; adds its metrics, weighted by ``share`` (its part of the tokens), to ``metrics``."""
        import torch

        with self.compute_loss_context_manager():
            logps = completion_logps(model, policy, self.temperature)
        old = self._stack(part, "old_logps", mask) if self.num_iterations > 1 else None
        ref = self._stack(part, "ref_logps", mask) if self.algorithm.needs_reference_model() else None
        advantages = torch.cat([group.advantages for group in part]).to(logps.device, logps.dtype)
        batch = PolicyBatch(
            logps=logps,
            old_logps=logps.detach() if old is None else old,
            ref_logps=ref,
            mask=mask,
            advantages=advantages,
            num_sequences=num_sequences,
            num_tokens=num_tokens,
            max_completion_length=self.max_completion_length,
        )
        out = self.algorithm.loss(batch)
        found = dict(out.metrics)
        if "kl" not in found and ref is not None:  # a KL in the reward (RLOO), or none: logged all the same
            found["kl"] = masked_average(k3_kl(logps.detach(), ref), mask)
        for key, value in found.items():
            metrics[key] += float(value) * share
        return out.loss / self.current_gradient_accumulation_steps

    def _loss_passes(self, model: Any, groups: list[Group]) -> list[list[Group]]:
        """``groups`` split into the forward and backward passes that fit the GPU (see
        :mod:`vistune.rl.loss_passes`); one pass on a CPU or when they all fit."""
        from vistune.models import text_config
        from vistune.rl.loss_passes import free_gpu_bytes, groups_per_pass

        checkpointing = bool(self.args.gradient_checkpointing or getattr(model, "is_activation_checkpointing", False))
        device = next(model.parameters()).device
        size = groups_per_pass(groups, text_config=text_config(getattr(model, "config", None)),
                               checkpointing=checkpointing, free_bytes=free_gpu_bytes(device))  # fmt: skip
        return [groups[i : i + size] for i in range(0, len(groups), size)]

    # -- rollouts --------------------------------------------------------------------

    def _rollout(self, prompts: list[Any]) -> list[Group]:
        import torch

        algorithm = self.algorithm
        model = self.accelerator.unwrap_model(self.model)
        target = len(prompts)
        kept: list[Group] = []
        last: list[Group] = []
        scored_groups: list[Group] = []
        filtered = rounds = 0
        pending = prompts
        max_rounds = algorithm.max_sampling_rounds if algorithm.refill_groups else 1
        while True:
            rounds += 1
            groups = self._sample(model, pending)
            self._score(groups)
            self._logps(model, groups)
            rewards = torch.cat([group.rewards for group in groups])
            lengths = torch.tensor([len(ids) for group in groups for ids in group.completion_ids])
            truncated = torch.tensor([t for group in groups for t in group.truncated])
            kl = None
            if algorithm.needs_reference_model():
                kl = torch.cat([self._sequence_kl(group) for group in groups])
            shaped = algorithm.shape_rewards(rewards, RolloutStats(lengths, truncated, self.max_completion_length, kl))
            shaped = shaped.reshape(len(groups), self.num_generations)
            # groups are judged on what the reward functions said (DAPO filters on accuracy, not on shaping)
            keep = algorithm.select_groups(rewards.reshape(len(groups), self.num_generations))
            for group, row, selected in zip(groups, shaped, keep.tolist()):
                group.shaped = row
                if selected:
                    kept.append(group)
                else:
                    filtered += 1
            scored_groups += groups
            last = groups
            if not algorithm.refill_groups or len(kept) >= target or rounds >= max_rounds:
                break
            pending = self._more_prompts(target - len(kept))
        if not kept:
            # nothing worth learning from after every round: train on the last round (zero advantages), which keeps
            # every process doing the same forward and backward passes
            kept = last
        shaped = torch.stack([group.shaped for group in kept])
        advantages = algorithm.advantages(shaped)
        unscored = torch.isnan(torch.stack([group.rewards for group in kept]))
        advantages = torch.where(unscored, torch.zeros_like(advantages), advantages)
        for group, row in zip(kept, advantages):
            group.advantages = row
        self._log_rollout(scored_groups, filtered, rounds)
        return kept

    def _sample(self, model: Any, prompts: list[Any]) -> list[Group]:
        from vistune.inference import SamplingParams

        if self._engine is None:
            self._engine = make_engine(self.backend, model, self.processing_class, self.encoder,
                                       max_batch_size=max(len(prompts) * self.num_generations, 1),
                                       config=self.vistune_config)  # fmt: skip
        elif callable(getattr(self._engine, "update_weights", None)):
            self._engine.update_weights(model)
        self._rollouts += 1
        seed = random.Random(f"{self.args.seed}-{self.args.process_index}-{self._rollouts}").randrange(2**31)
        sampling = SamplingParams(
            max_tokens=self.max_completion_length,
            temperature=self.temperature,
            top_p=self.vistune_config.top_p,
            n=self.num_generations,
            seed=seed,
        )
        adapter = getattr(model, "active_adapter", None) if hasattr(model, "peft_config") else None
        self._engine.max_batch_size = max(self._engine.max_batch_size, len(prompts) * self.num_generations)
        was_training = model.training
        model.eval()  # no dropout while sampling
        try:
            return generate_groups(self._engine, self.encoder, prompts, sampling, adapter=adapter)
        finally:
            model.train(was_training)

    def _score(self, groups: list[Group]) -> None:
        import torch

        from vistune.plugins import get_plugin_manager

        prompts, completions, sources = [], [], []
        columns: dict[str, list[Any]] = defaultdict(list)
        names = list(dict.fromkeys(key for group in groups for key in group.prompt.columns))
        for group in groups:
            for text in group.texts:
                prompts.append(group.prompt.messages)
                completions.append(text)
                sources.append(group.prompt.source)
                for name in names:
                    columns[name].append(group.prompt.columns.get(name))
                columns["images"].append(group.prompt.images)
        completion_ids = [ids for group in groups for ids in group.completion_ids]
        scores = self.scorer.score(
            prompts, completions, columns, sources, completion_ids=completion_ids, trainer_state=self.state
        )
        get_plugin_manager().hook.vistune_rollout_scored(
            prompts=prompts, completions=completions, rewards=scores, step=self.state.global_step
        )
        totals = combine(scores, self.scorer.weights)
        start = 0
        for group in groups:
            end = start + group.size
            group.scores = {name: values[start:end] for name, values in scores.items()}
            group.rewards = torch.tensor(totals[start:end], dtype=torch.float32)
            start = end

    def _logps(self, model: Any, groups: list[Group]) -> None:
        """Sampling-policy (mu > 1, or a KL in the reward) and reference log-probabilities of every completion."""
        import torch

        need_old = self.num_iterations > 1 or self.algorithm.needs_reference_model()
        need_ref = self.algorithm.needs_reference_model()
        if not (need_old or need_ref):
            return
        inputs = policy_inputs(groups, self.pad_id, model)
        lengths = [int(n) for n in inputs["completion_mask"].sum(dim=1).tolist()]
        with torch.no_grad(), self.compute_loss_context_manager():
            if need_old:
                self._split(groups, "old_logps", completion_logps(model, inputs, self.temperature), lengths)
            if need_ref:
                with self._reference(model) as reference:
                    self._split(groups, "ref_logps", completion_logps(reference, inputs, self.temperature), lengths)

    def _reference(self, model: Any):
        """The reference model: a separate frozen model, a frozen adapter, or the policy without its adapter."""
        return reference_model(model, self.ref_model, self.ref_adapter)

    def _sequence_kl(self, group: Group) -> Any:
        import torch

        return torch.stack([(old - ref).sum() for old, ref in zip(group.old_logps, group.ref_logps)]).float().cpu()

    # -- tensors -------------------------------------------------------------------

    @staticmethod
    def _split(groups: list[Group], field: str, logps: Any, lengths: list[int]) -> None:
        rows = iter(zip(logps.detach(), lengths))
        for group in groups:
            setattr(group, field, [row[:length].clone() for row, length in (next(rows) for _ in range(group.size))])

    @staticmethod
    def _stack(groups: list[Group], field: str, mask: Any) -> Any:
        import torch

        out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        row = 0
        for group in groups:
            for values in getattr(group, field):
                out[row, : values.shape[0]] = values.to(out.device, out.dtype)
                row += 1
        return out

    # -- logging -------------------------------------------------------------------------

    def _log_rollout(self, groups: list[Group], filtered: int, rounds: int) -> None:
        import torch

        metrics = self._metrics
        rewards = torch.cat([group.rewards for group in groups])
        scored = rewards[~torch.isnan(rewards)]
        metrics["reward"].append(float(scored.mean()) if scored.numel() else math.nan)
        metrics["reward_std"].append(float(scored.std()) if scored.numel() > 1 else math.nan)
        for name in self.scorer.names:
            values = [v for group in groups for v in group.scores.get(name, []) if v is not None]
            metrics[f"reward/{name}"].append(sum(values) / len(values) if values else math.nan)
        shaped = torch.cat([group.shaped for group in groups])
        if not torch.equal(torch.nan_to_num(shaped, nan=0.0), torch.nan_to_num(rewards, nan=0.0)):
            kept = shaped[~torch.isnan(shaped)]
            metrics["reward_shaped"].append(float(kept.mean()) if kept.numel() else math.nan)
        lengths = [len(ids) for group in groups for ids in group.completion_ids]
        metrics["completion_length/mean"].append(sum(lengths) / len(lengths))
        metrics["completion_length/min"].append(min(lengths))
        metrics["completion_length/max"].append(max(lengths))
        truncated = [t for group in groups for t in group.truncated]
        metrics["completion_truncated"].append(sum(truncated) / len(truncated))
        metrics["filtered_groups"].append(filtered)
        metrics["sampling_rounds"].append(rounds)
        for name, count in self.scorer.pop_error_counts().items():
            metrics[f"reward_errors/{name}"].append(count)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # per metric: (its values since the last log combined, how many values)
        local = {}
        for key, values in self._metrics.items():
            finite = [v for v in values if not math.isnan(v)]
            local[key] = (float(_combine(key, finite)), len(finite))
        merged = self._merge_processes(local) if self.args.world_size > 1 else local
        for key, (total, count) in merged.items():
            if not count:
                logs[key] = None
            elif _reduction(key) == "mean":
                logs[key] = total / count
            else:
                logs[key] = total
        self._metrics.clear()
        super().log(logs, start_time)

    def _merge_processes(self, local: dict[str, tuple[float, int]]) -> dict[str, tuple[float, int]]:
        """Every process's metrics merged, so the main process logs the whole batch's figures."""
        import torch
        from accelerate.utils import gather_object

        keys = sorted(set(gather_object(list(local))))  # every process sends the same keys in the same order
        if not keys:
            return {}
        rows = [list(local.get(key, (0.0, 0))) for key in keys]
        mine = torch.tensor(rows, dtype=torch.float64, device=self.accelerator.device).reshape(1, -1, 2)
        every = self.accelerator.gather(mine).reshape(-1, len(keys), 2).tolist()
        merged = {}
        for k, key in enumerate(keys):
            values = [process[k] for process in every if process[k][1] > 0]
            merged[key] = (_combine(key, [v for v, _ in values]), int(sum(c for _, c in values)))
        return merged

    def close_engine(self) -> None:
        """Stop the rollout engine (its scheduler thread)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None


@contextmanager
def reference_model(model: Any, ref_model: Any = None, ref_adapter: str | None = None):
    """The reference of a KL term, in eval mode: ``ref_model``, else ``model`` on its frozen ``ref_adapter``,
    else ``model`` with its adapter disabled (or as it is, without one).

    It runs in eval mode: the reference is a fixed distribution, without dropout.
    """
    if ref_model is not None:
        yield ref_model
        return
    was_training = model.training
    model.eval()
    try:
        if ref_adapter is not None:
            previous = model.active_adapter
            model.set_adapter(ref_adapter)
            try:
                yield model
            finally:
                model.set_adapter(previous)
        else:
            with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
                yield model
    finally:
        model.train(was_training)
