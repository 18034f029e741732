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

from artifex_fn._src.families import flow as _flow
from artifex_fn.training.trainer import Trainer
from artifex_fn.training.trainer import key_data

FlowConfig = _flow.FlowConfig

_CONFIG = "_flow_config"


def _model_apply(model, x_t, t):
    return model(x_t, t)


class FlowTrainer(Trainer):
    """Trains an NNX velocity field by conditional flow matching.

    Args:
      model: ``nnx.Module`` with ``model(x_t, t) -> v_hat``; an optional
        ``data_shape`` attribute is the default shape of one sample.
      optimizer: ``nnx.Optimizer(model, tx, wrt=nnx.Param)``. For gradient
        clipping chain ``optax.clip_by_global_norm`` into ``tx``.
      config: :class:`FlowConfig` with ``apply``, ``optimizer`` and
        ``max_grad_norm`` left None. Numeric fields are traced, so
        assigning a config with another ``sigma_min`` does not recompile.
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

    def __init__(self, model, optimizer, config=None, *, key=None):
        if config is None:
            config = FlowConfig()
        if not isinstance(config, FlowConfig):
            raise TypeError("`config` must be a FlowConfig, got "
                            f"{type(config).__name__}.")
        if config.apply is not None:
            raise ValueError("`config.apply` must be None: the trainer calls "
                             "`model(x_t, t)`.")
        if config.optimizer is not None and config.optimizer is not getattr(
                optimizer, "tx", None):
            raise ValueError("`config.optimizer` must be None: the trainer "
                             "uses the nnx.Optimizer's transformation.")
        if config.max_grad_norm is not None:
            raise ValueError(
                "`config.max_grad_norm` must be None for FlowTrainer: chain "
                "optax.clip_by_global_norm into the optimizer instead.")
        super().__init__(model, optimizer, config, key=key)
        self._config_cache = (None, None)
        self._sample = jax.jit(self._pure_sample, static_argnames=(
            "n", "shape", "num_steps", "method"))

    def _config_arg(self):
        """The config without its static callables (cached per config)."""
        if self._config_cache[0] is not self.config:
            self._config_cache = (self.config, dataclasses.replace(
                self.config, apply=None, optimizer=None))
        return self._config_cache[1]

    def compute_loss(self, model, batch, key):
        """``(loss, metrics)`` of :func:`artifex_fn.families.flow.loss`."""
        config = self._config_arg()
        if isinstance(batch, dict) and _CONFIG in batch:
            config = batch[_CONFIG]
            batch = {k: v for k, v in batch.items() if k != _CONFIG}
        config = dataclasses.replace(config, apply=_model_apply)
        return _flow.loss(model, batch, config, key)

    def train_step(self, batch, *args, **kwargs):
        """One compiled flow-matching step on ``x1`` or ``{"x": x1, ...}``."""
        if args or kwargs:
            raise TypeError("FlowTrainer.train_step takes only the batch.")
        if isinstance(batch, dict):
            if "x" not in batch:
                raise ValueError("batch is missing the key 'x'.")
            wrapped = dict(batch)
        else:
            wrapped = {"x": batch}
        wrapped[_CONFIG] = self._config_arg()
        return super().train_step(wrapped)

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
