"""Generative-model families as pure ``init`` / ``update`` pairs.

One module per family, each with a config (numeric hyper-parameters are
pytree leaves), ``init``, ``loss``, ``update`` and its samplers:

* :mod:`artifex_fn.families.vae`: ELBO with KL annealing and free bits;
* :mod:`artifex_fn.families.gan`: non-saturating and hinge losses,
  alternating discriminator/generator steps in one update;
* :mod:`artifex_fn.families.diffusion`: DDPM with linear/cosine schedules,
  EMA, and a sampler whose steps are distrax Normals (DDPO's MDP);
* :mod:`artifex_fn.families.flow`: conditional flow matching (rectified /
  OT-CFM) with an ODE sampler;
* :mod:`artifex_fn.families.energy`: contrastive divergence with Langevin
  sampling;
* :mod:`artifex_fn.families.autoregressive`: teacher forcing, scheduled
  sampling (generation lives in :mod:`artifex_fn.sampling`).
"""

from artifex_fn.families import autoregressive
from artifex_fn.families import diffusion
from artifex_fn.families import energy
from artifex_fn.families import flow
from artifex_fn.families import gan
from artifex_fn.families import vae

__all__ = ("autoregressive", "diffusion", "energy", "flow", "gan", "vae")
