"""Reward functions written as TRL documents them, used by examples/grpo_qwen2_vl.yaml unchanged.

Each takes the completions (and any dataset column it names, here ``answer``) by keyword and
returns one float per completion; ``**kwargs`` takes the rest (prompts, completion_ids, ...).
"""

import re


def reward_len(completions, **kwargs):
    """Prefer answers of about 20 words (TRL's documentation example, in words rather than characters)."""
    return [-abs(20 - len(completion.split())) / 20 for completion in completions]


def format_reward(completions, answer, **kwargs):
    """1.0 when the completion is a finished sentence that contains the answer, else 0.0."""
    return [
        1.0 if re.search(r"[.!?]\s*$", completion) and expected.lower() in completion.lower() else 0.0
        for completion, expected in zip(completions, answer)
    ]
