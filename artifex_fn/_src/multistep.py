"""Multi-step returns and advantages: discounted returns, lambda-returns, GAE.

Conventions (shared by every function here):

* Time runs along ``time_axis`` (the last axis by default); every other axis
  is a batch axis. ``rewards[..., t]`` is the reward for the transition
  ``s_t -> s_{t+1}`` taken with action ``a_t``.
* ``terminated[..., t]`` marks that ``s_{t+1}`` is terminal: nothing is
  bootstrapped past it. ``truncated[..., t]`` marks that the episode was cut
  after step ``t`` (time limit, end of a rollout): the recursion stops but the
  value of ``s_{t+1}`` is bootstrapped. Termination wins where both are set.
* ``values`` holds ``V(s_0..s_{T-1})`` (length ``T``) or ``V(s_0..s_T)``
  (length ``T + 1``, the spec's convention). The value bootstrapped after step
  ``t`` is ``next_values[..., t]`` when given (needed with auto-resetting
  environments, whose ``values[..., t + 1]`` belongs to the next episode),
  else ``values[..., t + 1]``, else ``bootstrap_value`` (zero when absent) for
  the last step.
* ``gamma`` and ``lambda_`` must lie in ``[0, 1]``: a concrete value
  outside raises ``ValueError``; a traced one (inside the caller's
  ``jit``/``vmap``) cannot raise and makes the whole result NaN.
* ``mask[..., t] == 0`` marks padding. Padded steps give zero, none of their
  inputs is read (they may hold NaN or inf: they are replaced before any
  arithmetic, so neither the result nor its gradient sees them), and the
  recursion stops after the last valid step before padding. There it
  bootstraps from ``next_values[..., t]`` when given, from
  ``values[..., t + 1]`` when ``values`` holds ``T + 1`` entries, and
  otherwise from ``bootstrap_value`` (zero when absent), exactly as the
  call on the sliced trajectory ``rewards[..., :L]`` with ``values[...,
  :L]`` or ``values[..., :L + 1]`` does: a right-padded batch gives on its
  valid prefix what the sliced trajectories give.

All three quantities solve one reverse linear recurrence
``x_t = a_t + b_t x_{t+1}``. ``method="scan"`` runs a sequential
``lax.scan`` that forms ``a_t`` and ``b_t`` inside the step from the inputs
that were given (the fastest on CPU, where with time on the last axis it
reads each step's slice in place, a few rows at a time, instead of
transposing); ``method="associative"`` builds every
``(a_t, b_t)`` and composes the affine maps with ``lax.associative_scan``
(log-depth, meant for accelerators and long horizons).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from artifex_fn._src import checks

Method = Literal["auto", "scan", "associative"]
_METHODS = ("auto", "scan", "associative")

# Horizon from which `method="auto"` takes the associative scan on GPU/TPU.
# On CPU the sequential scan is faster at every length we measured
# (benchmarks/bench_returns.py).
ASSOCIATIVE_MIN_LENGTH = 256


def resolve_method(method: str, length: int) -> str:
    """Returns the concrete method ``"scan"`` or ``"associative"``.

    ``"auto"`` picks the sequential scan on CPU, where it is the fastest at
    every length we measured; on GPU and TPU it picks the associative scan
    for horizons of at least ``ASSOCIATIVE_MIN_LENGTH`` steps.
    """
    checks.check_choice(method, _METHODS, "method")
    if method != "auto":
        return method
    if jax.default_backend() == "cpu" or length < ASSOCIATIVE_MIN_LENGTH:
        return "scan"
    return "associative"


def reverse_linear_recurrence(a: jax.Array, b: jax.Array, *,
                              method: Method = "auto") -> jax.Array:
    """Solves ``x_t = a_t + b_t * x_{t+1}`` backwards with ``x_T = 0``.

    Args:
      a: ``[T, ...]`` offsets, time on axis 0.
      b: ``[T, ...]`` multipliers, same shape as ``a``.
      method: ``"scan"``, ``"associative"`` or ``"auto"``.

    Returns:
      ``[T, ...]`` solution ``x``.
    """
    method = resolve_method(method, a.shape[0])
    if method == "scan":
        def step(carry, ab):
            a_t, b_t = ab
            x_t = a_t + b_t * carry
            return x_t, x_t

        _, xs = lax.scan(step, jnp.zeros_like(a[0]), (a, b), reverse=True)
        return xs

    # Each step is the affine map x -> a + b x. Composing step t with the
    # already-composed suffix (A, B) gives (a + b A, b B).
    def compose(later, earlier):
        a_l, b_l = later
        a_e, b_e = earlier
        return a_e + b_e * a_l, b_e * b_l

    xs, _ = lax.associative_scan(compose, (a, b), reverse=True)
    return xs


def _recurrence_terms(rewards, values, *, gamma, lambda_, terminated,
                      truncated, next_values, bootstrap_value, mask,
                      time_axis):
    """Pieces of the (a, b) form, built in the caller's layout.

    All arithmetic happens on arrays laid out as given (elementwise kernels
    that XLA fuses); only ``a`` and ``b`` are later moved to time-major.
    Inputs must have passed :func:`_check_inputs`.
    """
    rewards = jnp.asarray(rewards)
    axis = time_axis % rewards.ndim
    shape = tuple(rewards.shape)
    length = shape[axis]
    batch_shape = shape[:axis] + shape[axis + 1:]
    out_dtype, dt = checks.float_dtypes(rewards, values, next_values,
                                        bootstrap_value)

    def full(x):
        return jnp.broadcast_to(jnp.asarray(x), shape).astype(dt)

    def param(x):
        x = jnp.asarray(x)
        return x.astype(dt) if x.ndim == 0 else full(x)

    def shift_in(x, last):
        """``x[t + 1]`` along time, with ``last`` after the final step."""
        head = lax.slice_in_dim(x, 1, length, axis=axis)
        return jnp.concatenate([head, jnp.expand_dims(last, axis)], axis=axis)

    boot = (jnp.zeros(batch_shape, dt) if bootstrap_value is None else
            jnp.broadcast_to(jnp.asarray(bootstrap_value),
                             batch_shape).astype(dt))
    v = None
    if values is None:
        nv = shift_in(jnp.zeros(shape, dt), boot)
    else:
        v_all = jnp.asarray(values).astype(dt)
        if v_all.shape[axis] == length + 1:
            v = lax.slice_in_dim(v_all, 0, length, axis=axis)
            nv = lax.slice_in_dim(v_all, 1, length + 1, axis=axis)
        else:
            v = v_all
            nv = shift_in(v, boot)
    if next_values is not None:
        nv = full(next_values)

    # Continuation of the recursion past step t: not truncated, next step is
    # not padding, and t is not the last step (x_T = 0).
    steps = lax.broadcasted_iota(jnp.int32, shape, axis)
    cont = (steps < length - 1).astype(dt)
    if truncated is not None:
        cont = cont * (1.0 - full(truncated))
    m = None
    if mask is not None:
        m = full(mask)
        cont = cont * shift_in(m, jnp.ones(batch_shape, dt))
    discount = param(gamma)
    if terminated is not None:
        discount = discount * (1.0 - full(terminated))
    return dict(r=full(rewards), v=v, nv=nv, discount=discount, cont=cont,
                lam=param(lambda_), m=m, axis=axis, out_dtype=out_dtype)


def _check_inputs(rewards, values, *, terminated, truncated, next_values,
                  bootstrap_value, mask, gamma, lambda_, time_axis):
    """Validates shapes at trace time; returns (rewards, axis, shape)."""
    rewards = jnp.asarray(rewards)
    checks.check_min_rank(rewards, 1, "rewards")
    axis = checks.normalize_axis(time_axis, rewards.ndim, "time_axis")
    shape = tuple(rewards.shape)
    for name, x in (("terminated", terminated), ("truncated", truncated),
                    ("next_values", next_values), ("mask", mask),
                    ("gamma", gamma), ("lambda_", lambda_)):
        if x is not None:
            checks.check_broadcastable(jnp.asarray(x), shape, name)
    batch_shape = shape[:axis] + shape[axis + 1:]
    if bootstrap_value is not None:
        checks.check_broadcastable(jnp.asarray(bootstrap_value), batch_shape,
                                   "bootstrap_value")
    if next_values is not None and bootstrap_value is not None:
        raise ValueError(
            "Pass either `next_values` or `bootstrap_value`, not both: "
            "`next_values[..., -1]` is the bootstrap value.")
    if values is not None:
        values = jnp.asarray(values)
        plus_one = shape[:axis] + (shape[axis] + 1,) + shape[axis + 1:]
        if tuple(values.shape) == plus_one:
            if bootstrap_value is not None:
                raise ValueError(
                    "`values` holds T + 1 entries (its last is the "
                    "bootstrap value), so `bootstrap_value` must be None.")
        elif tuple(values.shape) != shape:
            raise ValueError(
                f"`values` must have shape {shape} (V(s_0..s_T-1)) or "
                f"{plus_one} (V(s_0..s_T)), got {tuple(values.shape)}.")
    return rewards, axis, shape


# Row strides (bytes) that are a multiple of this make the rows of a
# [B, T] array map onto few cache sets.
_ALIASING_STRIDE = 4096


def _cpu_layout(shape, axis, itemsize):
    """How the sequential scan reads its inputs: ``(layout, group)``.

    ``("column", g)``: in the caller's layout, reading one time slice per
    step (no transpose), ``g`` rows at a time (``lax.map`` over groups of
    ``g`` rows when there are more); ``("time_major", None)``: transposed to
    time-major first. Measured on CPU (benchmarks/bench_returns.py): the
    transposes XLA emits cost more than the recurrence itself, and column
    reads are fastest while a group's rows stay in the caches: about 8 rows
    (a divisor of the batch in 6-16), or 4 when a row is a multiple of 4 KiB
    long (its rows then share cache sets).
    """
    if jax.default_backend() != "cpu" or axis != len(shape) - 1:
        return "time_major", None
    batch = math.prod(shape[:-1])
    if batch <= 8:
        return "column", batch
    aliasing = (shape[-1] * itemsize) % _ALIASING_STRIDE == 0
    for group in ((4,) if aliasing else (8, 10, 12, 6, 16)):
        if batch % group == 0:
            return "column", group
    return "time_major", None


def _scan_path(kind, rewards, values, *, gamma, lambda_, terminated,
               truncated, next_values, bootstrap_value, mask, time_axis,
               layout="time_major", group=None):
    """Sequential reverse scan that forms the coefficients inside the step.

    With ``layout="time_major"`` only the arrays that were given are moved
    to time-major; with ``layout="column"`` (time on the last axis) none
    is moved and each step reads its time slice in place, for ``group``
    rows at a time. The value after the last step enters through the
    initial carry. This keeps the work outside the loop to a few transposes
    (or none), which is what dominates on CPU (benchmarks/bench_returns.py).
    ``kind`` is ``"returns"``, ``"lambda"`` or ``"gae"``.
    """
    rewards, axis, shape = _check_inputs(
        rewards, values, terminated=terminated, truncated=truncated,
        next_values=next_values, bootstrap_value=bootstrap_value, mask=mask,
        gamma=gamma, lambda_=lambda_, time_axis=time_axis)
    length = shape[axis]
    batch_shape = shape[:axis] + shape[axis + 1:]
    out_dtype, dt = checks.float_dtypes(rewards, values, next_values,
                                        bootstrap_value)

    column = layout == "column"

    def time_major(x):
        x = jnp.broadcast_to(jnp.asarray(x), shape)
        return x.astype(dt) if column else jnp.moveaxis(x, axis, 0).astype(dt)

    xs = {"r": time_major(rewards)}
    for key, x in (("d", terminated), ("u", truncated), ("m", mask)):
        if x is not None:
            xs[key] = time_major(x)
    params = {}
    for key, x in (("g", gamma), ("lam", lambda_)):
        x = jnp.asarray(x)
        if x.ndim:
            xs[key] = time_major(x)
        else:
            params[key] = x.astype(dt)

    v_last = (jnp.zeros(batch_shape, dt) if bootstrap_value is None else
              jnp.broadcast_to(jnp.asarray(bootstrap_value),
                               batch_shape).astype(dt))
    if values is not None and column:
        # Kept whole: steps read v[t] for t < T only, so no slice copy.
        v = jnp.asarray(values).astype(dt)
        if v.shape[axis] == length + 1:
            v_last = lax.index_in_dim(v, length, axis, keepdims=False)
        if kind == "gae" or next_values is None:
            xs["v"] = v
    elif values is not None:
        v = jnp.moveaxis(jnp.asarray(values), axis, 0).astype(dt)
        if v.shape[0] == length + 1:
            v_last, v = v[-1], v[:-1]
        if kind == "gae" or next_values is None:
            xs["v"] = v
    if next_values is not None:
        xs["nv"] = time_major(next_values)
        v_last = (lax.index_in_dim(xs["nv"], length - 1, axis, keepdims=False)
                  if column else xs["nv"][-1])
    cuts = truncated is not None or mask is not None

    def step(carry, x):
        acc, v_next, m_next = carry
        c = x["g"] if "g" in x else params["g"]
        if "d" in x:
            c = c * (1.0 - x["d"])
        lam = x["lam"] if "lam" in x else params["lam"]
        nv = x["nv"] if "nv" in x else v_next
        k = None
        if cuts:
            k = 1.0 - x["u"] if "u" in x else 1.0
            if "m" in x:
                k = k * m_next
        if kind == "gae":
            b = c * lam if k is None else c * lam * k
            y = x["r"] + c * nv - x["v"] + b * acc
        elif kind == "returns":
            y = (x["r"] + c * acc if k is None else
                 x["r"] + c * ((1.0 - k) * nv + k * acc))
        else:
            lk = lam if k is None else lam * k
            y = x["r"] + c * ((1.0 - lk) * nv + lk * acc)
        if "m" in x:
            y = jnp.where(x["m"] > 0, y, 0.0)
            m_next = x["m"]
        if kind == "returns" and "nv" not in x:
            # Discounted returns bootstrap only after the last step.
            v_next = jnp.zeros_like(v_next) if cuts else v_next
        elif "v" in x:
            v_next = x["v"]
        return (y, v_next, m_next), y

    init_acc = jnp.zeros(batch_shape, dt) if kind == "gae" else v_last
    init = (init_acc, v_last, jnp.ones(batch_shape, dt))
    if column:
        def rows(xs, init):
            def body(i, state):
                carry, out = state
                t = length - 1 - i
                x = {key: lax.dynamic_index_in_dim(arr, t, -1, keepdims=False)
                     for key, arr in xs.items()}
                carry, y = step(carry, x)
                return carry, lax.dynamic_update_index_in_dim(out, y, t, -1)

            out = jnp.zeros(init[0].shape + (length,), dt)
            return lax.fori_loop(0, length, body, (init, out))[1]

        batch = math.prod(batch_shape)
        if batch <= group:
            out = rows(xs, init)
        else:
            # Groups of rows: (batch // group, group, ...) is a free reshape.
            def split(x):
                return x.reshape((batch // group, group) + x.shape[axis:])

            out = lax.map(lambda a: rows(*a),
                          (jax.tree.map(split, xs),
                           jax.tree.map(lambda c: c.reshape(
                               batch // group, group), init)))
        return out.reshape(shape).astype(out_dtype)
    _, out = lax.scan(step, init, xs, reverse=True)
    return jnp.moveaxis(out, 0, axis).astype(out_dtype)


def _clean_padding(kind, rewards, values, *, axis, gamma, lambda_,
                   terminated, truncated, next_values, bootstrap_value, mask,
                   time_axis):
    """Inputs with every padded entry replaced by zero, before any maths.

    Returns ``(rewards, values, kwargs)`` in which ``values`` (if any) has
    ``T`` entries and ``next_values`` holds the value bootstrapped after
    every step: ``values[..., t + 1]`` inside a valid run; after the last
    valid step before padding (or the last step), ``values[..., t + 1]`` for
    ``T + 1`` values and ``bootstrap_value`` (or zero) for ``T`` values and
    for discounted returns. Selecting with ``where`` first keeps NaN or
    inf in the padding out of the values *and* of the gradients (``0 *
    nan`` would be NaN). Each input keeps its dtype.
    """
    shape = tuple(rewards.shape)
    length = shape[axis]
    batch_shape = shape[:axis] + shape[axis + 1:]
    valid = jnp.broadcast_to(jnp.asarray(mask), shape) > 0

    def clean(x):
        if x is None:
            return None
        x = jnp.broadcast_to(jnp.asarray(x), shape)
        return jnp.where(valid, x, False if x.dtype == bool else 0)

    def shift_in(x, last):
        """``x[t + 1]`` along time, ``last`` after the final step."""
        head = lax.slice_in_dim(x, 1, length, axis=axis)
        return jnp.concatenate([head, jnp.expand_dims(last, axis)],
                               axis=axis)

    # True where step t + 1 exists and is valid.
    next_valid = shift_in(valid, jnp.zeros(batch_shape, bool))
    if bootstrap_value is None:
        boot = None
    else:
        boot = jnp.asarray(bootstrap_value)
        boot = jnp.broadcast_to(jnp.expand_dims(
            jnp.broadcast_to(boot, batch_shape), axis), shape)
    v = None
    if next_values is not None:
        nv = clean(next_values)
        if values is not None:
            v = clean(lax.slice_in_dim(jnp.asarray(values), 0, length,
                                       axis=axis))
    elif values is None:  # discounted returns: bootstrap at the cut only
        nv = (None if boot is None else
              jnp.where(valid & ~next_valid, boot, 0))
    else:
        values = jnp.asarray(values)
        v = clean(lax.slice_in_dim(values, 0, length, axis=axis))
        if values.shape[axis] == length + 1:
            nv = clean(lax.slice_in_dim(values, 1, length + 1, axis=axis))
        else:
            last = (jnp.zeros(batch_shape, values.dtype) if boot is None
                    else jnp.zeros(batch_shape, jnp.result_type(
                        values, boot)))
            after = shift_in(values, last)
            after = jnp.where(next_valid, after, 0 if boot is None else boot)
            nv = clean(after)
    if nv is None:
        nv = jnp.zeros(shape, rewards.dtype)

    def clean_param(x):
        return x if jnp.ndim(x) == 0 else clean(x)

    kwargs = dict(gamma=clean_param(gamma), lambda_=clean_param(lambda_),
                  terminated=clean(terminated), truncated=clean(truncated),
                  next_values=nv, bootstrap_value=None, mask=mask,
                  time_axis=time_axis)
    return clean(rewards), v, kwargs


def _solve(kind, rewards, values, *, method, stop_target_gradients,
           **kwargs):
    """Dispatches to the in-step scan or to the (a, b) form.

    The sequential scan on CPU picks a layout with :func:`_cpu_layout`:
    ``"column"`` forms the coefficients inside the step from time slices
    read in place (no transpose). Otherwise discounted and lambda-returns
    form their coefficients inside a time-major scan step (fewest
    transposes) and GAE builds ``a = delta`` and ``b`` in the caller's
    layout and scans those two arrays time-major. The associative method
    always uses the (a, b) form.
    """
    rewards = jnp.asarray(rewards)
    checks.check_min_rank(rewards, 1, "rewards")
    axis = checks.normalize_axis(kwargs["time_axis"], rewards.ndim,
                                 "time_axis")
    method = resolve_method(method, rewards.shape[axis])
    if kwargs["mask"] is not None:
        _check_inputs(rewards, values, **kwargs)
        rewards, values, kwargs = _clean_padding(kind, rewards, values,
                                                 axis=axis, **kwargs)
    # Out-of-range discounts raise when concrete; traced ones give NaN.
    # (Checked after the padding is replaced: padded steps hold anything.)
    ok = checks.all_ok(
        checks.check_hparam(kwargs["gamma"], "gamma", lo=0.0, hi=1.0),
        checks.check_hparam(kwargs["lambda_"], "lambda_", lo=0.0, hi=1.0))
    layout, group = "time_major", None
    if method == "scan":
        _, dt = checks.float_dtypes(rewards, values, kwargs["next_values"],
                                    kwargs["bootstrap_value"])
        layout, group = _cpu_layout(tuple(rewards.shape), axis,
                                    jnp.dtype(dt).itemsize)
    if method == "scan" and (kind != "gae" or layout == "column"):
        x = checks.nan_unless(ok, _scan_path(
            kind, rewards, values, layout=layout, group=group, **kwargs))
        return lax.stop_gradient(x) if stop_target_gradients else x
    _check_inputs(rewards, values, **kwargs)
    terms = _recurrence_terms(rewards, values, **kwargs)
    c, k, lam = terms["discount"], terms["cont"], terms["lam"]
    if kind == "gae":
        a = terms["r"] + c * terms["nv"] - terms["v"]
    else:
        a = terms["r"] + c * (1.0 - lam * k) * terms["nv"]
    b = c * lam * k
    m = terms["m"]
    if m is not None:
        valid = m > 0
        a = jnp.where(valid, a, 0.0)
        b = jnp.where(valid, b, 0.0)
    a = jnp.moveaxis(jnp.broadcast_to(a, rewards.shape), axis, 0)
    b = jnp.moveaxis(jnp.broadcast_to(b, rewards.shape), axis, 0)
    x = reverse_linear_recurrence(a, b, method=method)
    x = jnp.moveaxis(x, 0, axis).astype(terms["out_dtype"])
    x = checks.nan_unless(ok, x)
    return lax.stop_gradient(x) if stop_target_gradients else x


def discounted_returns(
    rewards: jax.Array,
    *,
    gamma: float | jax.Array,
    terminated: jax.Array | None = None,
    truncated: jax.Array | None = None,
    next_values: jax.Array | None = None,
    bootstrap_value: jax.Array | None = None,
    mask: jax.Array | None = None,
    time_axis: int = -1,
    stop_target_gradients: bool = True,
    method: Method = "auto",
) -> jax.Array:
    r"""Discounted returns with separate termination and truncation.

    .. math::
        G_t = r_t + \gamma_t (1 - d_t)\,[(1 - u_t)\, G_{t+1} + u_t\, V'_t]

    with ``d`` = ``terminated``, ``u`` = ``truncated`` (and the last step,
    and every step followed by padding) and ``V'_t`` the bootstrap value
    after step ``t`` (``next_values``, else zero; ``bootstrap_value`` for the
    last step). Without flags this is ``G_t = sum_k gamma^k r_{t+k}``
    (Sutton & Barto 2018, eq. 3.8).

    Args:
      rewards: ``[..., T]`` rewards (time on ``time_axis``).
      gamma: discount in ``[0, 1]``; a scalar or an array broadcastable to
        ``rewards`` (per-step discounts).
      terminated: optional ``[..., T]`` flags, true where ``s_{t+1}`` is
        terminal.
      truncated: optional ``[..., T]`` flags, true where the episode was cut
        after step ``t`` (bootstrap from ``next_values``).
      next_values: optional ``[..., T]`` values ``V(s_{t+1})`` to bootstrap
        from at truncations and at the last step.
      bootstrap_value: optional ``[...]`` value of the state after the last
        step (``[B]`` for ``[B, T]`` rewards).
      mask: optional ``[..., T]``, zero on padding steps.
      time_axis: the axis that indexes time.
      stop_target_gradients: wrap the result in ``stop_gradient``.
      method: ``"scan"``, ``"associative"`` or ``"auto"``.

    Returns:
      ``[..., T]`` returns, in the dtype of ``rewards``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> afn.discounted_returns(jnp.array([1.0, 1.0, 1.0]), gamma=0.5)
      Array([1.75, 1.5 , 1.  ], dtype=float32)
      >>> afn.discounted_returns(jnp.array([1.0, 1.0, 1.0]), gamma=0.5,
      ...                        terminated=jnp.array([0, 1, 0]))
      Array([1.5, 1. , 1. ], dtype=float32)
    """
    return _solve("returns", rewards, None, gamma=gamma, lambda_=1.0,
                  terminated=terminated, truncated=truncated,
                  next_values=next_values, bootstrap_value=bootstrap_value,
                  mask=mask, time_axis=time_axis, method=method,
                  stop_target_gradients=stop_target_gradients)


def lambda_returns(
    rewards: jax.Array,
    values: jax.Array,
    *,
    gamma: float | jax.Array,
    lambda_: float | jax.Array,
    terminated: jax.Array | None = None,
    truncated: jax.Array | None = None,
    next_values: jax.Array | None = None,
    bootstrap_value: jax.Array | None = None,
    mask: jax.Array | None = None,
    time_axis: int = -1,
    stop_target_gradients: bool = True,
    method: Method = "auto",
) -> jax.Array:
    r"""TD(lambda) returns (Sutton & Barto 2018, sec. 12.1).

    .. math::
        G^\lambda_t = r_t + \gamma_t (1 - d_t)\,
          [(1 - \lambda u'_t) V'_t + \lambda u'_t G^\lambda_{t+1}]

    where ``u'_t = 1 - truncated_t`` (zero at the last step and before
    padding) and ``V'_t`` is the value bootstrapped after step ``t`` (see
    the module docstring). ``lambda_ = 1`` gives Monte-Carlo returns
    bootstrapped at the end, ``lambda_ = 0`` one-step TD targets.

    Args:
      rewards: ``[..., T]`` rewards.
      values: ``[..., T]`` values ``V(s_t)`` or ``[..., T + 1]`` values
        including ``V(s_T)``.
      gamma: discount in ``[0, 1]``, scalar or broadcastable to ``rewards``.
      lambda_: mixing parameter in ``[0, 1]``, scalar or broadcastable.

    The other arguments (``terminated``, ``truncated``, ``next_values``,
    ``bootstrap_value``, ``mask``, ``time_axis``, ``stop_target_gradients``,
    ``method``) are as in :func:`discounted_returns`.

    Returns:
      ``[..., T]`` lambda-returns in the dtype of ``rewards``/``values``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> afn.lambda_returns(jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0, 4.0]),
      ...                    gamma=1.0, lambda_=0.5)
      Array([4., 4.], dtype=float32)
    """
    return _solve("lambda", rewards, values, gamma=gamma, lambda_=lambda_,
                  terminated=terminated, truncated=truncated,
                  next_values=next_values, bootstrap_value=bootstrap_value,
                  mask=mask, time_axis=time_axis, method=method,
                  stop_target_gradients=stop_target_gradients)


def gae_advantages(
    rewards: jax.Array,
    values: jax.Array,
    *,
    gamma: float | jax.Array,
    lambda_: float | jax.Array,
    terminated: jax.Array | None = None,
    truncated: jax.Array | None = None,
    next_values: jax.Array | None = None,
    bootstrap_value: jax.Array | None = None,
    mask: jax.Array | None = None,
    time_axis: int = -1,
    stop_target_gradients: bool = True,
    method: Method = "auto",
) -> jax.Array:
    r"""Generalized Advantage Estimation (Schulman et al. 2016, eq. 16).

    .. math::
        \delta_t = r_t + \gamma_t (1 - d_t) V'_t - V(s_t), \qquad
        A_t = \delta_t + \gamma_t \lambda (1 - d_t) u'_t A_{t+1}

    with ``u'_t = 1 - truncated_t`` (zero at the last step and before
    padding) and ``V'_t`` the value bootstrapped after step ``t``. At a
    truncation the TD error still bootstraps from ``V'_t``; at a termination
    it does not. ``lambda_ = 0`` gives the TD errors, ``lambda_ = 1`` the
    Monte-Carlo returns minus the values. The value targets are
    ``advantages + values``.

    Args:
      rewards: ``[..., T]`` rewards.
      values: ``[..., T]`` values ``V(s_t)`` or ``[..., T + 1]`` values
        including ``V(s_T)``.
      gamma: discount in ``[0, 1]``, scalar or broadcastable to ``rewards``.
      lambda_: GAE lambda in ``[0, 1]``, scalar or broadcastable.

    The other arguments (``terminated``, ``truncated``, ``next_values``,
    ``bootstrap_value``, ``mask``, ``time_axis``, ``stop_target_gradients``,
    ``method``) are as in :func:`discounted_returns`.

    Returns:
      ``[..., T]`` advantages in the dtype of ``rewards``/``values``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> afn.gae_advantages(jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0, 4.0]),
      ...                    gamma=1.0, lambda_=0.5)
      Array([4., 2.], dtype=float32)
    """
    return _solve("gae", rewards, values, gamma=gamma, lambda_=lambda_,
                  terminated=terminated, truncated=truncated,
                  next_values=next_values, bootstrap_value=bootstrap_value,
                  mask=mask, time_axis=time_axis, method=method,
                  stop_target_gradients=stop_target_gradients)
