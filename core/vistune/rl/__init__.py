"""Reinforcement learning: the algorithm interface, reward loading and the rollout trainer.

``algorithm``  the :class:`~vistune.rl.algorithm.RLAlgorithm` protocol plugins implement.
``objectives`` policy-gradient building blocks (importance ratios, clipping, KL, loss normalisation).
``rewards``    rewards from plugins or local files, called and combined under the run's rules.
``rollout``    prompts -> sampled completions and their per-token log-probabilities.
``trainer``    the training loop: rollouts, rewards, group filtering, advantages, the plugin's loss.
"""
