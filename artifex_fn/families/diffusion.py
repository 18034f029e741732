"""Denoising diffusion (DDPM, Ho et al. 2020) and DDPO (Black et al. 2023).

Pure training (:func:`init` / :func:`update` / :func:`loss` with a
:class:`DiffusionConfig`), noise schedules (linear; cosine of Nichol &
Dhariwal 2021), the reverse chain as ``distrax`` Gaussian steps
(:func:`step_distribution`, :func:`sample_chain`), and the pieces that make
the chain a policy for :mod:`artifex_fn.grpo` (:func:`ddpo_policy`,
:func:`ddpo_batch`, :func:`chain_kl`). See
:mod:`artifex_fn._src.families.diffusion` and
:mod:`artifex_fn._src.families.diffusion_sampling` for the maths.
"""

from artifex_fn._src.families.networks import EpsMLP
from artifex_fn._src.families.diffusion import DiffusionConfig
from artifex_fn._src.families.diffusion import DiffusionState
from artifex_fn._src.families.diffusion import ema_decay_at
from artifex_fn._src.families.diffusion import ema_update
from artifex_fn._src.families.diffusion import init
from artifex_fn._src.families.diffusion import loss
from artifex_fn._src.families.diffusion import schedule_of
from artifex_fn._src.families.diffusion import update
from artifex_fn._src.families.diffusion_sampling import SCHEDULES
from artifex_fn._src.families.diffusion_sampling import VARIANCES
from artifex_fn._src.families.diffusion_sampling import NoiseSchedule
from artifex_fn._src.families.diffusion_sampling import chain_kl
from artifex_fn._src.families.diffusion_sampling import chain_timesteps
from artifex_fn._src.families.diffusion_sampling import ddpo_batch
from artifex_fn._src.families.diffusion_sampling import ddpo_policy
from artifex_fn._src.families.diffusion_sampling import noise_schedule
from artifex_fn._src.families.diffusion_sampling import posterior_mean
from artifex_fn._src.families.diffusion_sampling import predict_x0
from artifex_fn._src.families.diffusion_sampling import q_sample
from artifex_fn._src.families.diffusion_sampling import sample_chain
from artifex_fn._src.families.diffusion_sampling import step_distribution
from artifex_fn._src.families.diffusion_sampling import step_std

__all__ = (
    "EpsMLP",
    "DiffusionConfig", "DiffusionState", "NoiseSchedule", "SCHEDULES",
    "VARIANCES", "chain_kl", "chain_timesteps", "ddpo_batch", "ddpo_policy",
    "ema_decay_at", "ema_update", "init", "loss", "noise_schedule",
    "posterior_mean", "predict_x0", "q_sample", "sample_chain",
    "schedule_of", "step_distribution", "step_std", "update",
)
