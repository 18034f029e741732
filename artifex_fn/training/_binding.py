"""Cheap, repeated reads and writes of a Flax NNX object's variables.

A trainer runs a compiled pure function on arrays and must move the arrays
in and out of the user's ``nnx.Module`` / ``nnx.Optimizer`` on every step.
``nnx.state`` / ``nnx.update`` walk the object graph each call (about a
millisecond for a small model); :class:`VariableBinding` walks it once,
keeps the ``Variable`` objects, and reads or writes their values directly
(tens of microseconds). The arrays are always those of the live objects,
so changes the user makes through ``nnx.update`` are seen on the next step;
replacing whole submodules after the trainer is built is not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


_get_raw = object.__getattribute__
_set_raw = object.__setattr__


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _plain(var) -> bool:
    """A Variable holding a plain ``jax.Array``, without value hooks."""
    try:
        raw = _get_raw(var, "_raw_value")
        meta = _get_raw(var, "_var_metadata")
    except AttributeError:
        return False
    return (isinstance(raw, jax.Array) and not nnx.variablelib.is_array_ref(raw)
            and "on_get_value" not in meta and "on_set_value" not in meta)


class VariableBinding:
    """The variables of ``node`` selected by ``filters``, as a pytree.

    ``read()`` returns the pure pytree of arrays (the structure
    ``nnx.as_pure(nnx.state(node, *filters))`` has), ``write(tree)`` sets the
    values from a tree of that structure.
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
        # Plain array values without get/set hooks are read and written
        # directly; anything else goes through get_value/set_value.
        self._fast = all(_plain(v) for v in self.variables)

    def read(self):
        if self._fast:
            leaves = [_get_raw(v, "_raw_value") for v in self.variables]
        else:
            leaves = [v.get_value() for v in self.variables]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def write(self, tree) -> None:
        leaves = self.treedef.flatten_up_to(tree)
        if self._fast:
            for var, value in zip(self.variables, leaves):
                _set_raw(var, "_raw_value", value)
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
        self._fast = all(_plain(v) for v in self.variables)

    def __len__(self) -> int:
        return len(self.variables)
