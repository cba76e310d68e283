"""Training machinery shared by the sft and rl pipelines: arguments, trainer,
atomic checkpoints, per-part learning rates and metrics."""
