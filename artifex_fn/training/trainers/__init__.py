"""The trainers' implementation, one module per kind.

``base`` (:class:`~artifex_fn.training.Trainer`, the shared machinery),
``rl`` (REINFORCE, PPO, GRPO, DPO) and one module per model family. Import
the trainers from :mod:`artifex_fn.training`.
"""
