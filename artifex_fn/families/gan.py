"""Generative adversarial networks (Goodfellow et al. 2014): pure ``init``/``update``.

See :mod:`artifex_fn._src.families.gan` for the losses and the update; the
NNX trainer is :class:`artifex_fn.training.GANTrainer`.
"""

from artifex_fn._src.families.gan import LOSS_TYPES
from artifex_fn._src.families.gan import GANConfig
from artifex_fn._src.families.gan import discriminator_loss
from artifex_fn._src.families.gan import discriminator_objective
from artifex_fn._src.families.gan import generator_loss
from artifex_fn._src.families.gan import generator_objective
from artifex_fn._src.families.gan import init
from artifex_fn._src.families.gan import loss
from artifex_fn._src.families.gan import noise
from artifex_fn._src.families.gan import sample
from artifex_fn._src.families.gan import update

__all__ = ("GANConfig", "LOSS_TYPES", "init", "loss", "update", "sample",
           "noise", "discriminator_loss", "generator_loss",
           "discriminator_objective", "generator_objective")
