"""Alignment: reward models, DPO (and IPO, robust, hinge), PPO with a KL penalty, GRPO with verifiable rewards.

Every aligner is a `loss_fn(model, batch)` and a `get_batch(step)` data object on the shared Trainer, and all
of them score completions with the one function `lmlab.align.logprobs.completion_logprobs`.
"""
