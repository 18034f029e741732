"""NNX trainer for flow-matching models over the pure flow-matching loss.

The model is an ``nnx.Module`` whose ``__call__(x_t [B, ...], t float32
[B])`` returns the velocity ``v_hat [B, ...]`` of the flow from noise
(``t = 0``) to data (``t = 1``). Each ``train_step`` is one compiled
gradient step on :func:`artifex_fn.families.flow.loss` (conditional flow
matching, Lipman et al. 2023; rectified flow, Liu et al. 2023; OT-CFM,
Tong et al. 2023); :meth:`FlowTrainer.sample` integrates the learned ODE.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from artifex_fn.families import flow as _flow
from artifex_fn.training.trainers.base import Trainer
from artifex_fn.training.trainers.base import data_batch
from artifex_fn.training.trainers.base import key_data


def _model_apply(model, x_t, t):
    return model(x_t, t)


class FlowTrainer(Trainer):
    """Trains an NNX velocity field by conditional flow matching.

    Args:
      model: ``nnx.Module`` with ``model(x_t, t) -> v_hat``; an optional
        ``data_shape`` attribute is the default shape of one sample.
      optimizer: ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.
      config: :class:`~artifex_fn.families.flow.FlowConfig` with ``apply``
        and ``optimizer`` left None; ``max_grad_norm`` clips the gradient.
        Numeric fields are traced, so assigning a config with another
        ``sigma_min`` does not recompile.
      key: seed or PRNG key for the noise, times and OT pairings.

    ``train_step(batch)`` takes ``x1 [B, ...]`` or ``{"x": x1}``
    (optionally with ``x0`` and ``t``) and returns device metrics ``loss,
    pair_cost, grad_norm``.

    Example::

        trainer = FlowTrainer(model, nnx.Optimizer(
            model, optax.adam(1e-3), wrt=nnx.Param), FlowConfig(path="ot"))
        for x in batches:
            trainer.train_step(x)
        samples = trainer.sample(512, key=0, shape=(2,), num_steps=20)
    """

    config_type = _flow.FlowConfig
    model_fields = ("apply",)
    model_fields_hint = "the trainer calls `model(x_t, t)`"

    def __init__(self, model, optimizer, config=None, *, key=None):
        super().__init__(model, optimizer, config, key=key)
        self._sample = jax.jit(self._pure_sample, static_argnames=(
            "n", "shape", "num_steps", "method"))

    def loss_and_metrics(self, model, batch, key, config, step):
        """The flow-matching loss of ``model`` on ``x1`` or ``{"x": x1}``."""
        del step
        config = dataclasses.replace(config, apply=_model_apply)
        return _flow.loss(model, data_batch(batch), config, key)

    def compute_loss(self, model, batch, key):
        """``(loss, metrics)`` of :func:`artifex_fn.families.flow.loss`."""
        return self.loss_and_metrics(model, batch, key, self.config_arg(),
                                     None)

    def _pure_sample(self, params, rest, key, *, n, shape, num_steps,
                     method):
        model = nnx.merge(self.graphdef, params, rest)
        x0 = jax.random.normal(key, (n,) + shape)
        return _flow.sample_ode(_model_apply, model, x0, num_steps=num_steps,
                                method=method)

    def sample(self, n: int, key=None, shape=None, *, num_steps: int = 50,
               method: str = "midpoint"):
        """``n`` samples ``[n, *shape]``: noise pushed through the ODE.

        Args:
          n: number of samples.
          key: seed or PRNG key (default: split from the trainer's key).
          shape: shape of one sample; defaults to ``model.data_shape``.
          num_steps, method: the ODE solver (see
            :func:`artifex_fn.families.flow.sample_ode`).
        """
        if shape is None:
            shape = getattr(self.model, "data_shape", None)
            if shape is None:
                raise ValueError("pass `shape` or give the model a "
                                 "`data_shape` attribute.")
        if method not in _flow.ODE_METHODS:
            raise ValueError(f"`method` must be one of "
                             f"{list(_flow.ODE_METHODS)}, got {method!r}.")
        if key is None:
            self.key, key = jax.random.split(self.key)
        params, rest, _, _ = self._read()
        return self._sample(params, rest, key_data(key), n=int(n),
                            shape=tuple(int(s) for s in shape),
                            num_steps=int(num_steps), method=method)
