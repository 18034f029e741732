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


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


class VariableBinding:
    """The variables of ``node`` selected by ``filters``, as a pytree.

    ``read()`` returns the pure pytree of arrays (the structure
    ``nnx.as_pure(nnx.state(node, *filters))`` has), ``write(tree)`` sets the
    values from a tree of that structure.
    """

    def __init__(self, node, *filters):
        self.variables, self.treedef = jax.tree_util.tree_flatten(
            nnx.state(node, *filters), is_leaf=_is_variable)

    @classmethod
    def of_tree(cls, tree) -> "VariableBinding":
        """Binds the ``Variable`` leaves of a pytree (e.g. an optimiser state)."""
        self = cls.__new__(cls)
        self.variables, self.treedef = jax.tree_util.tree_flatten(
            tree, is_leaf=_is_variable)
        if not all(_is_variable(v) for v in self.variables):
            raise TypeError("every leaf of the tree must be an nnx.Variable.")
        return self

    def read(self):
        return jax.tree_util.tree_unflatten(
            self.treedef, [v.get_value() for v in self.variables])

    def write(self, tree) -> None:
        leaves = self.treedef.flatten_up_to(tree)
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

    def __len__(self) -> int:
        return len(self.variables)
