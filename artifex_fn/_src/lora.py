"""LoRA adapters for any NNX model, and their memory.

:func:`add_lora` wraps the model's ``nnx.Linear`` layers in ``nnx.LoRA``
adapters (Hu et al. 2021): ``y = W x + b + B A x`` with ``A`` ``[in, r]``
and ``B`` ``[r, out]`` (``B`` zero at the start, so the adapted model
computes exactly what the base did). Train only the adapters with
``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``; a trainer built with
``lora_reference=True`` then scores the reference log-probs with the same
model and every adapter zeroed, which is the frozen base: no second copy
of the weights is held. In the functional API the same holds with the
adapters as the parameters: ``ref_params = zeros_like(adapters)``.

Public as :mod:`artifex_fn.lora`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from flax import nnx


def add_lora(model: nnx.Module, *, rank: int, rngs: nnx.Rngs,
             select: Callable[[tuple, nnx.Linear], bool] | None = None
             ) -> int:
    """Wraps ``nnx.Linear`` layers of ``model`` in ``nnx.LoRA``, in place.

    Args:
      model: any ``nnx.Module``.
      rank: the adapters' rank ``r >= 1``.
      rngs: initialises the ``A`` matrices (``B`` starts at zero).
      select: optional ``(path, linear) -> bool`` choosing the layers
        (``path`` is the tuple of attribute names and list indices);
        default: every ``nnx.Linear``.

    Returns:
      The number of layers adapted.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> mlp = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
      ...                      nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
      >>> x = jnp.ones((1, 4))
      >>> before = mlp(x)
      >>> add_lora(mlp, rank=2, rngs=nnx.Rngs(2))
      2
      >>> bool(jnp.all(mlp(x) == before))  # B = 0: the base's outputs
      True
    """
    if not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"`rank` must be an int >= 1, got {rank!r}.")
    count = 0

    def wrap(layer, path):
        nonlocal count
        if isinstance(layer, nnx.Linear) and (select is None
                                              or select(path, layer)):
            count += 1
            return nnx.LoRA(layer.in_features, int(rank), layer.out_features,
                            base_module=layer, dtype=layer.dtype,
                            param_dtype=layer.param_dtype, rngs=rngs)
        if isinstance(layer, nnx.Module) and not isinstance(layer, nnx.LoRA):
            visit(layer, path)
        return layer

    def visit(node, path):
        if isinstance(node, nnx.List) or isinstance(node, nnx.Sequential):
            items = (node.layers if isinstance(node, nnx.Sequential)
                     else node)
            for i in range(len(items)):
                items[i] = wrap(items[i], path + (i,))
            return
        for name, child in list(vars(node).items()):
            if isinstance(child, nnx.Module):
                setattr(node, name, wrap(child, path + (name,)))

    visit(model, ())
    return count


def parameter_bytes(model: nnx.Module, wrt=nnx.Param) -> int:
    """Bytes of the ``wrt`` variables of ``model`` (e.g. ``nnx.Param``: all
    weights; ``nnx.LoRAParam``: the adapters)."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize
               for x in jax.tree_util.tree_leaves(nnx.state(model, wrt)))


def tree_bytes(tree) -> int:
    """Bytes of every array in a pytree (e.g. an optimiser state)."""
    return sum(int(np.prod(np.shape(x))) * np.asarray(x).dtype.itemsize
               for x in jax.tree_util.tree_leaves(tree))


def optimizer_bytes(optimizer: nnx.Optimizer) -> int:
    """Bytes of an ``nnx.Optimizer``'s state (moments, counts)."""
    return tree_bytes(nnx.state(optimizer.opt_state))
