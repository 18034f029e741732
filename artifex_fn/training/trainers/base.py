"""The base :class:`Trainer`: a thin stateful shell around pure steps.

A trainer binds a Flax NNX model and an ``nnx.Optimizer``. Each
``train_step`` reads the arrays out of them, runs one compiled pure
function, and writes the results back, so the model object the user holds
is always the trained one. Metrics stay on device: nothing in a step waits
for the accelerator.

**Config into a compiled step, one way for every trainer.** A trainer's
config is a frozen dataclass registered as a pytree: its numbers are
leaves, its integers that fix shapes, its strings and its functions are
static metadata. The trainer fills the function fields (``policy``,
``encode``, ``apply``, ``optimizer``, ...) from its model(s) and
optimiser(s) inside the compiled step and passes the rest as an argument.
So assigning ``trainer.config = dataclasses.replace(trainer.config,
beta=0.05)`` takes effect on the next step without recompiling; a new
value of a static integer (``num_minibatches``, ``num_timesteps``)
compiles once more; a config carrying other functions raises (build a new
trainer). ``max_grad_norm``, where a config has it, clips the gradient by
its global norm before the optimiser, in every trainer.

Subclasses either override :meth:`Trainer.train_step` (the RL and GAN
trainers call the algorithms' ``update``) or implement
:meth:`Trainer.loss_and_metrics` (the family trainers; user subclasses
may implement :meth:`Trainer.compute_loss` instead) and inherit the
compiled gradient step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from artifex_fn import distributed
from artifex_fn.training.callbacks.base import CallbackList


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _plain(var) -> bool:
    """A variable holding a plain ``jax.Array`` without value hooks, whose
    raw value is its value (``get_raw_value`` / ``set_raw_value``)."""
    raw = var.get_raw_value()
    return (isinstance(raw, jax.Array)
            and not nnx.variablelib.is_array_ref(raw)
            and not var.has_metadata("on_get_value")
            and not var.has_metadata("on_set_value"))


class VariableBinding:
    """The variables of an NNX object selected by filters, as a pytree.

    ``nnx.state`` / ``nnx.update`` walk the object graph on every call
    (about a millisecond for a small model); a binding walks it once,
    keeps the ``nnx.Variable`` objects, and reads or writes their values
    with ``Variable.get_raw_value`` / ``set_raw_value`` (a plain array and
    no value hooks) or ``get_value`` / ``set_value`` (tens of
    microseconds in all).
    The arrays are always those of the live objects, so changes the user
    makes through ``nnx.update`` are seen on the next step; replacing whole
    submodules after the trainer is built is not.

    ``read()`` returns the pure pytree of arrays (the structure
    ``nnx.as_pure(nnx.state(node, *filters))`` has), ``write(tree)`` sets
    the values from a tree of that structure.
    """

    def __init__(self, node, *filters):
        self._bind(nnx.state(node, *filters))

    @classmethod
    def of_tree(cls, tree) -> "VariableBinding":
        """Binds the ``Variable`` leaves of a pytree (e.g. an optimiser state)."""
        self = cls.__new__(cls)
        self._bind(tree)
        if not all(_is_variable(v) for v in self.variables):
            raise TypeError("every leaf of the tree must be an nnx.Variable.")
        return self

    def _bind(self, tree) -> None:
        self.variables, self.treedef = jax.tree_util.tree_flatten(
            tree, is_leaf=_is_variable)
        self._plain = all(_plain(v) for v in self.variables)

    def read(self):
        if self._plain:
            leaves = [v.get_raw_value() for v in self.variables]
        else:
            leaves = [v.get_value() for v in self.variables]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def write(self, tree) -> None:
        leaves = self.treedef.flatten_up_to(tree)
        if self._plain:
            for var, value in zip(self.variables, leaves):
                var.set_raw_value(value)
        else:
            for var, value in zip(self.variables, leaves):
                var.set_value(value)

    def strong_types(self) -> None:
        """Makes weakly-typed array values strong (same dtype).

        A compiled step returns strongly-typed arrays; writing them back over
        weakly-typed initial values would change the input types and
        compile the step a second time.
        """
        for var in self.variables:
            value = var.get_value()
            if getattr(getattr(value, "aval", None), "weak_type", False):
                var.set_value(jnp.asarray(value, dtype=value.dtype))
        self._plain = all(_plain(v) for v in self.variables)

    def __len__(self) -> int:
        return len(self.variables)


def key_data(key) -> jax.Array:
    """A raw ``uint32[2]`` key from an int seed, raw key or typed key (the
    one normaliser of keys in the trainer layer)."""
    if key is None:
        key = 0
    if isinstance(key, (int, np.integer)):
        return jax.random.key_data(jax.random.key(int(key)))
    key = jnp.asarray(key) if not hasattr(key, "dtype") else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return jnp.asarray(key, jnp.uint32)


def _describe_paths(tree) -> list[str]:
    return sorted(jax.tree_util.keystr(p)
                  for p, _ in jax.tree_util.tree_leaves_with_path(tree))


def check_state_layout(state: dict[str, Any], reference: dict[str, Any]):
    """Checks that ``state`` has the layout of ``reference`` (a trainer's
    own ``state_dict()``): the same keys, and under each the same pytree
    structure, leaf shapes and dtypes (``step`` only needs to be an
    integer scalar). Raises ``ValueError`` naming the first difference."""
    unknown = sorted(set(state) - set(reference))
    if unknown:
        raise ValueError(f"state has unknown entries {unknown}; this "
                         f"trainer's state_dict() has {sorted(reference)}.")
    for name, want in reference.items():
        got = state.get(name)
        if got is None:   # an optional entry left as it is
            continue
        if name == "step":
            if np.ndim(got) != 0 or not np.issubdtype(np.asarray(got).dtype,
                                                      np.integer):
                raise ValueError(f"state['step'] must be an integer scalar, "
                                 f"got {got!r}.")
            continue
        treedef = jax.tree_util.tree_structure(want)
        try:
            leaves = treedef.flatten_up_to(got)
        except (ValueError, TypeError):
            want_paths, got_paths = _describe_paths(want), _describe_paths(got)
            missing = [p for p in want_paths if p not in got_paths][:4]
            extra = [p for p in got_paths if p not in want_paths][:4]
            raise ValueError(
                f"state['{name}'] does not have the structure of this "
                f"trainer's (a state of another model or optimiser?): "
                f"missing {missing}, unexpected {extra}.") from None
        for (path, ref), leaf in zip(
                jax.tree_util.tree_leaves_with_path(want), leaves):
            ref_shape, ref_dtype = np.shape(ref), np.asarray(ref).dtype if (
                not hasattr(ref, "dtype")) else ref.dtype
            shape = np.shape(leaf)
            dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(
                leaf).dtype
            if shape != ref_shape or dtype != ref_dtype:
                raise ValueError(
                    f"state['{name}']{jax.tree_util.keystr(path)} has shape "
                    f"{shape} and dtype {dtype}; this trainer's has "
                    f"{ref_shape} and {ref_dtype} (a state of another model "
                    f"or optimiser?).")


def _function_fields(config) -> dict[str, Any]:
    """The fields of a dataclass config that hold functions or optax
    transformations (not numbers)."""
    if not dataclasses.is_dataclass(config):
        return {}
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if callable(value) or isinstance(value, optax.GradientTransformation):
            out[f.name] = value
    return out


def _check_same_functions(before, after) -> None:
    """A new config may change numbers, not the functions the trainer was
    built around (they are baked into its compiled steps or replaced by the
    model's own)."""
    if type(after) is not type(before):
        raise TypeError(
            f"`trainer.config` must stay a {type(before).__name__}, got "
            f"{type(after).__name__}: build a new trainer for another "
            "algorithm.")
    if not dataclasses.is_dataclass(before):
        return
    old, new = _function_fields(before), _function_fields(after)
    for name in sorted(set(old) | set(new)):
        if old.get(name) is not new.get(name):
            raise ValueError(
                f"`trainer.config.{name}` cannot change after the trainer is "
                f"built (it is part of the trainer: the model, the "
                f"nnx.Optimizer and their functions); build a new trainer "
                f"with the new {name} instead.")


def data_batch(batch) -> dict[str, Any]:
    """A family trainer's batch: ``{"x": x, ...}`` as given, or an array
    ``x`` as ``{"x": x}``."""
    if isinstance(batch, dict):
        if "x" not in batch:
            raise ValueError(f"batch is missing the key 'x' (got keys "
                             f"{sorted(batch)}).")
        return batch
    return {"x": batch}


def check_optimizer_type(name, optimizer) -> None:
    if not isinstance(optimizer, nnx.Optimizer):
        raise TypeError(
            f"`{name}` must be an nnx.Optimizer, e.g. "
            "`nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.Param)`; got "
            f"{type(optimizer).__name__}.")


def check_optimizer_matches(name, model_name, optimizer, params, opt_state):
    """The optimiser's state has the structure its ``tx`` gives the
    model's trainable variables."""
    expected = jax.eval_shape(optimizer.tx.init, params.read())
    got = opt_state.read()
    same = jax.tree_util.tree_structure(expected) == opt_state.treedef and all(
        jnp.shape(x) == jnp.shape(y) for x, y in zip(
            jax.tree_util.tree_leaves(expected),
            jax.tree_util.tree_leaves(got)))
    if not same:
        raise ValueError(
            f"`{name}` was not built for `{model_name}` (its state does not "
            f"match the trainable variables): build it as "
            f"`nnx.Optimizer({model_name}, tx, wrt=nnx.Param)`.")


def bind_model_and_optimizer(model, optimizer, *, names=("optimizer",
                                                          "model")):
    """Bindings ``(params, rest, opt_state, opt_step)`` of a model and its
    ``nnx.Optimizer`` (checked to belong together), with weakly-typed
    values made strong so that the first compiled step is the only one."""
    bindings = (VariableBinding(model, optimizer.wrt),
                VariableBinding(model, nnx.Not(optimizer.wrt)),
                VariableBinding.of_tree(optimizer.opt_state),
                VariableBinding.of_tree(optimizer.step))
    check_optimizer_matches(*names, optimizer, bindings[0], bindings[2])
    for binding in bindings:
        binding.strong_types()
    return bindings


class Trainer:
    """Base trainer over an NNX ``model`` and ``nnx.Optimizer``.

    Args:
      model: a ``flax.nnx.Module``.
      optimizer: ``nnx.Optimizer(model, tx, wrt=...)`` built for ``model``;
        its ``wrt`` filter selects the trained variables. All other variables
        (batch statistics, RNG counters) are passed to the model read-only,
        except in the compiled gradient step of :meth:`compute_loss`
        trainers, which writes them back.
      config: the trainer's configuration (default: ``config_type()``).
        Its ``model_fields`` and ``optimizer`` must be None: the trainer
        fills them from the model and the optimiser.
      key: seed (int) or PRNG key for the trainer's own randomness
        (minibatch shuffling, noise, generation).

    Attributes:
      model, optimizer, config: as given.
      step: number of ``train_step`` calls applied (a Python int).
      key: the trainer's PRNG state (``uint32[2]``), advanced by steps that
        use randomness.
      stop_training: set by a callback to end :meth:`fit` after the current
        step.

    Class attributes for subclasses:
      config_type: the config class (None: any object, e.g. for a user
        subclass implementing :meth:`compute_loss`).
      model_fields: config fields holding functions of the model that the
        trainer fills (they must be None in the config given).
      model_fields_hint: how the trainer fills them, for the error message.
      optimizer_field: the config field of ``optimizer``'s transformation.
    """

    config_type: type | None = None
    model_fields: tuple[str, ...] = ()
    model_fields_hint: str = "the trainer calls the model"
    optimizer_field: str = "optimizer"

    def __init__(self, model, optimizer, config=None, *, key=None):
        if not isinstance(model, nnx.Module):
            raise TypeError(
                f"`model` must be a flax.nnx.Module, got {type(model).__name__}.")
        check_optimizer_type("optimizer", optimizer)
        self.model = model
        self.optimizer = optimizer
        self.config = self._checked_config(
            config, **{self.optimizer_field: optimizer},
            **self._other_optimizers())
        self.graphdef = nnx.graphdef(model)
        (self._params, self._rest, self._opt_state,
         self._opt_step) = bind_model_and_optimizer(model, optimizer)
        self.key = key_data(key)
        self.step = 0
        self.stop_training = False
        self._config_cache = (None, None)
        self._generic_step = jax.jit(self._pure_generic_step,
                                     static_argnames=("flags",))
        self.mesh = None

    # -- configuration ------------------------------------------------------
    def _default_config(self):
        return self.config_type()

    def _other_optimizers(self) -> dict[str, Any]:
        """Config field -> ``nnx.Optimizer`` of further models (GAN)."""
        return {}

    def _checked_config(self, config, **optimizers):
        """``config`` (or the default) after the checks every trainer makes:
        its type, its model fields None, its optimiser fields None or the
        given optimisers' transformations."""
        if self.config_type is None:
            return config
        if config is None:
            config = self._default_config()
        if not isinstance(config, self.config_type):
            raise TypeError(f"`config` must be a {self.config_type.__name__}, "
                            f"got {type(config).__name__}.")
        for name in self.model_fields:
            if getattr(config, name) is not None:
                raise ValueError(f"`config.{name}` must be None: "
                                 f"{self.model_fields_hint}.")
        for name, opt in optimizers.items():
            value = getattr(config, name, None)
            if value is not None and value is not opt.tx:
                raise ValueError(
                    f"`config.{name}` must be None: the trainer uses the "
                    "nnx.Optimizer's transformation.")
        return config

    @property
    def config(self):
        """The trainer's configuration.

        Assign a new one (``trainer.config = dataclasses.replace(
        trainer.config, beta=0.05)``) to change numbers for the next steps
        (no recompilation; a new static integer compiles once). Its
        functions (the optimiser, the policy or model functions) cannot
        change: the trainer was built around them, and a config carrying
        others raises ``ValueError`` saying to build a new trainer.
        """
        return self._config

    @config.setter
    def config(self, value):
        first = "_config" not in vars(self)
        if not first:
            _check_same_functions(self._config_at_start, value)
        else:
            self._config_at_start = value
        self._config = value

    def config_arg(self):
        """The config as the compiled steps take it: function fields None
        (static), numbers as leaves (traced). Cached per config object.
        None for a trainer without a ``config_type`` (a user subclass whose
        config may be any object: it reads ``self.config`` itself)."""
        if self.config_type is None:
            return None
        if self._config_cache[0] is not self.config:
            config = self.config
            if dataclasses.is_dataclass(config):
                names = {f.name for f in dataclasses.fields(config)}
                config = dataclasses.replace(config, **{
                    name: None for name in _function_fields(config)
                    if name in names})
            self._config_cache = (self.config, config)
        return self._config_cache[1]

    # -- placement on a mesh ----------------------------------------------
    def shard(self, mesh, *, fsdp: bool = False, min_fsdp_size: int = 1024):
        """Runs this trainer data-parallel over ``mesh``; returns ``self``.

        Places every variable of the model(s), the optimiser state and the
        trainer's key on ``mesh`` (replicated, or FSDP-sharded along the
        ``"fsdp"`` axis with ``fsdp=True``), and from then on splits each
        batch's leading axis over the mesh (see
        :mod:`artifex_fn.distributed`). The compiled steps are unchanged:
        ``jax.jit`` partitions them from the placement, and every loss,
        advantage and metric is still computed over the whole batch, so a
        step gives the single-device result up to summation order.

        Example: ``trainer = PPOTrainer(model, opt, config).shard(
        afn.distributed.make_mesh())``.
        """
        self.mesh = mesh
        for binding in self._bindings():
            binding.write(distributed.place_state(
                binding.read(), mesh, fsdp=fsdp, min_fsdp_size=min_fsdp_size))
        self.key = distributed.place_state(self.key, mesh)
        return self

    def _bindings(self) -> list[VariableBinding]:
        return [v for v in vars(self).values()
                if isinstance(v, VariableBinding)]

    def _place_batch(self, batch):
        """The batch split over the trainer's mesh (unchanged without one)."""
        if self.mesh is None:
            return batch
        return distributed.shard_batch(batch, self.mesh)

    # -- state ------------------------------------------------------------
    def _read(self):
        return (self._params.read(), self._rest.read(), self._opt_state.read(),
                self._opt_step.read())

    def _write(self, params, opt_state, opt_step, rest=None) -> None:
        self._params.write(params)
        self._opt_state.write(opt_state)
        self._opt_step.write(opt_step)
        if rest is not None:
            self._rest.write(rest)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: a pytree of arrays.

        Keys: ``params`` (trained variables), ``rest`` (other model
        variables), ``opt_state``, ``optimizer_step``, ``step`` and ``key``.
        """
        params, rest, opt_state, opt_step = self._read()
        return dict(params=params, rest=rest, opt_state=opt_state,
                    optimizer_step=opt_step,
                    step=jnp.asarray(self.step, jnp.int64
                                     if jax.config.jax_enable_x64
                                     else jnp.int32),
                    key=self.key)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output into the model and optimizer.

        Nothing is written unless every entry has the structure, shapes and
        dtypes of this trainer's own :meth:`state_dict` (a state saved from
        another model or optimiser raises ``ValueError`` naming the first
        entry that differs).
        """
        if not isinstance(state, dict):
            raise TypeError(f"`state` must be a dict (see state_dict()), got "
                            f"{type(state).__name__}.")
        missing = {"params", "opt_state", "step", "key"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}.")
        check_state_layout(state, self.state_dict())
        self._write(state["params"], state["opt_state"],
                    state.get("optimizer_step", self._opt_step.read()),
                    state.get("rest"))
        self.step = int(np.asarray(state["step"]))
        self.key = jnp.asarray(state["key"], jnp.uint32)

    # -- the generic compiled step ---------------------------------------
    def compute_loss(self, model, batch, key):
        """``(loss, metrics)`` of ``model`` on ``batch``; ``key`` for noise.

        A user subclass that does not override :meth:`train_step` implements
        this (or :meth:`loss_and_metrics`); it runs inside ``jax.jit`` and
        ``jax.grad`` on a merged copy of the model, so it must be
        traceable. The built-in trainers evaluate their loss with it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} implements neither compute_loss nor "
            "train_step.")

    def loss_and_metrics(self, model, batch, key, config, step):
        """The loss inside the compiled step: ``config`` is
        :meth:`config_arg` (traced numbers) and ``step`` the traced step
        count. Defaults to :meth:`compute_loss`."""
        del config, step
        return self.compute_loss(model, batch, key)

    def static_flags(self) -> tuple:
        """Hashable facts about the host-side config that decide the shape
        of the compiled step's computation (not its numbers); passed as a
        static argument, so a change compiles once. Default: none."""
        return ()

    def trace_config(self, config, flags):
        """The traced config as :meth:`loss_and_metrics` sees it, given
        :meth:`static_flags`. Default: unchanged."""
        del flags
        return config

    def _pure_generic_step(self, params, rest, opt_state, opt_step, key, step,
                           config, batch, *, flags):
        wrt, tx = self.optimizer.wrt, self.optimizer.tx
        config = self.trace_config(config, flags)
        key, sub = jax.random.split(key)
        model = nnx.merge(self.graphdef, params, rest)

        def loss_fn(model):
            return self.loss_and_metrics(model, batch, sub, config, step)

        (loss, metrics), grads = nnx.value_and_grad(
            loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)(model)
        grads = nnx.as_pure(grads)
        new_rest = nnx.as_pure(nnx.state(model, nnx.Not(wrt)))
        grad_norm = optax.tree.norm(grads)
        max_norm = getattr(config, "max_grad_norm", None)
        if max_norm is not None:
            grads, _ = optax.clip_by_global_norm(max_norm).update(
                grads, optax.EmptyState())
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm)
        return params, new_rest, opt_state, opt_step + 1, key, metrics

    def train_step(self, batch, *args, **kwargs) -> dict[str, jax.Array]:
        """One compiled gradient step on the loss; returns metrics.

        The gradient is clipped to ``config.max_grad_norm`` (global norm)
        when the config has one; ``grad_norm`` is the norm before clipping.
        """
        if args or kwargs:
            raise TypeError(
                f"{type(self).__name__}.train_step takes only the batch.")
        batch = self._place_batch(batch)
        params, rest, opt_state, opt_step = self._read()
        params, rest, opt_state, opt_step, self.key, metrics = (
            self._generic_step(params, rest, opt_state, opt_step, self.key,
                               np.int32(self.step), self.config_arg(), batch,
                               flags=self.static_flags()))
        self._write(params, opt_state, opt_step, rest)
        self.step += 1
        return metrics

    # -- the loop ---------------------------------------------------------
    def fit(self, data: Iterable[Any] | Callable[[int], Any], *,
            num_steps: int | None = None, callbacks: Iterable[Any] = (),
            reward_fn: Callable[..., Any] | None = None,
            key=None) -> dict[str, jax.Array] | None:
        """Runs ``train_step`` over ``data`` and drives the callbacks.

        Args:
          data: an iterable of batches, or a function ``step -> batch``
            (which makes resumed runs see the same batches as uninterrupted
            ones).
          num_steps: stop after this many steps of this call (required when
            ``data`` is a function).
          callbacks: objects with ``on_train_begin(trainer)``,
            ``on_train_batch_end(trainer, metrics, step)`` and
            ``on_train_end(trainer)`` (any may be missing).
          reward_fn: for trainers that generate (``GRPOTrainer``): calls
            ``train_step(batch, reward_fn, key_t)`` with
            ``key_t = fold_in(key, trainer.step)``.
          key: seed or PRNG key for generation (default: the trainer's key).

        Returns:
          The metrics of the last step (on device), or None if no step ran.
        """
        if callable(data) and not isinstance(data, Iterable):
            if num_steps is None:
                raise ValueError(
                    "`num_steps` is required when `data` is a function.")
            make_batch, start = data, self.step
            data = (make_batch(start + i) for i in range(num_steps))
        if num_steps is not None and num_steps < 0:
            raise ValueError(f"`num_steps` must be >= 0, got {num_steps}.")
        gen_key = None
        if reward_fn is not None:
            gen_key = self.key if key is None else key_data(key)
        cbs = CallbackList(callbacks)
        metrics = None
        self.stop_training = False
        cbs.on_train_begin(self)
        try:
            for i, batch in enumerate(data):
                if num_steps is not None and i >= num_steps:
                    break
                if reward_fn is not None:
                    step_key = jax.random.fold_in(gen_key, self.step)
                    metrics = self.train_step(batch, reward_fn, step_key)
                else:
                    metrics = self.train_step(batch)
                cbs.on_train_batch_end(self, metrics, self.step - 1)
                if self.stop_training:
                    break
        finally:
            cbs.on_train_end(self)
        return metrics

