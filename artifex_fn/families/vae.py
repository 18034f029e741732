"""Variational autoencoders (Kingma & Welling 2014): pure ``init``/``update``.

See :mod:`artifex_fn._src.families.vae` for the maths; the NNX trainer is
:class:`artifex_fn.training.VAETrainer`.
"""

from artifex_fn._src.families.vae import VAEConfig
from artifex_fn._src.families.vae import free_bits_kl
from artifex_fn._src.families.vae import gaussian_kl
from artifex_fn._src.families.vae import init
from artifex_fn._src.families.vae import kl_weight
from artifex_fn._src.families.vae import loss
from artifex_fn._src.families.vae import output_mean
from artifex_fn._src.families.vae import reconstruct
from artifex_fn._src.families.vae import reconstruction_loss
from artifex_fn._src.families.vae import reparameterize
from artifex_fn._src.families.vae import sample
from artifex_fn._src.families.vae import update

__all__ = ("VAEConfig", "init", "loss", "update", "gaussian_kl",
           "free_bits_kl", "kl_weight", "reconstruction_loss",
           "reparameterize", "output_mean", "reconstruct", "sample")
