"""Tests for discounted returns, lambda-returns, GAE and the linear recurrence.

Property tests run a jitted function that evaluates every variant at once
(three functions, both methods, each value layout). Trajectories drawn by
hypothesis are cut to a few horizons and a fixed batch size, so only a handful
of shapes is ever compiled.
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import artifex_fn as afn
from artifex_fn import testing as aft

from algo_fixtures import examples

METHODS = ("scan", "associative")
LENGTHS = (1, 3, 11)
BATCH = 4
RTOL, ATOL = 1e-4, 1e-3


PROPERTY = settings(max_examples=examples(40, ci_share=8), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Ways of passing the bootstrap values, evaluated by `_all_outputs`.
RETURN_LAYOUTS = ("none", "bootstrap", "next_values")
VALUE_LAYOUTS = ("plus_one", "bootstrap", "next_values")


# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------


def _canonical(traj, seed, *, per_step=False, with_mask=True,
               lengths=LENGTHS):
    """Fixed-batch version of a drawn trajectory batch.

    The horizon is cut to the largest entry of ``lengths`` not above the drawn
    one and the rows are cycled to ``BATCH`` rows. Adds ``next_values`` and
    ``[B, T]`` arrays for ``gamma`` and ``lambda_`` (constant unless
    ``per_step``).
    """
    length = max(n for n in lengths if n <= traj["rewards"].shape[1])
    rows = np.arange(BATCH) % traj["rewards"].shape[0]
    out = {k: traj[k][rows, :length]
           for k in ("rewards", "terminated", "truncated", "mask")}
    out["values"] = traj["values"][rows, :length + 1]
    if not with_mask:
        out["mask"] = np.ones_like(out["mask"])
    rng = np.random.default_rng(seed)
    shape = out["rewards"].shape
    out["next_values"] = rng.uniform(-10, 10, size=shape).astype(np.float32)
    if per_step:
        out["gamma"] = rng.uniform(0, 1, size=shape).astype(np.float32)
        out["lambda_"] = rng.uniform(0, 1, size=shape).astype(np.float32)
    else:
        out["gamma"] = np.full(shape, traj["gamma"], np.float32)
        out["lambda_"] = np.full(shape, traj["lambda_"], np.float32)
    return out


def _layout_kwargs(t, name, layout):
    """Keyword arguments (shared with the references) for one variant."""
    kw = dict(rewards=t["rewards"], gamma=t["gamma"],
              terminated=t["terminated"], truncated=t["truncated"],
              mask=t["mask"])
    v = t["values"]
    if name != "returns":
        kw["lambda_"] = t["lambda_"]
        kw["values"] = v if layout == "plus_one" else v[:, :-1]
    if layout == "bootstrap":
        kw["bootstrap_value"] = v[:, -1]
    elif layout == "next_values":
        kw["next_values"] = t["next_values"]
    return kw


@jax.jit
def _all_outputs(t):
    """Every function, method and layout on one batch (a dict of arrays)."""
    out = {}
    for method in METHODS:
        for layout in RETURN_LAYOUTS:
            kw = _layout_kwargs(t, "returns", layout)
            out[method, "returns", layout] = afn.discounted_returns(
                method=method, **kw)
        for name, fn in (("lambda", afn.lambda_returns),
                         ("gae", afn.gae_advantages)):
            for layout in VALUE_LAYOUTS:
                kw = _layout_kwargs(t, name, layout)
                out[method, name, layout] = fn(method=method, **kw)
    return out


def _outputs(t):
    keys = ("rewards", "values", "next_values", "gamma", "lambda_",
            "terminated", "truncated", "mask")
    out = _all_outputs({k: t[k] for k in keys})
    return {k: np.asarray(v) for k, v in out.items()}


_REFERENCES = {"returns": aft.np_discounted_returns,
               "lambda": aft.np_lambda_returns,
               "gae": aft.np_gae_advantages}


def _check_reference(name, traj, seed, per_step, with_mask):
    t = _canonical(traj, seed, per_step=per_step, with_mask=with_mask)
    out = _outputs(t)
    layouts = RETURN_LAYOUTS if name == "returns" else VALUE_LAYOUTS
    for layout in layouts:
        ref = _REFERENCES[name](**_layout_kwargs(t, name, layout))
        for method in METHODS:
            got = out[method, name, layout]
            assert got.shape == ref.shape and got.dtype == np.float32
            np.testing.assert_allclose(
                got, ref, rtol=RTOL, atol=ATOL,
                err_msg=f"{name} {layout} {method}")


def _random_batch(seed, batch=3, length=7):
    rng = np.random.default_rng(seed)
    return dict(
        rewards=rng.normal(size=(batch, length)).astype(np.float32),
        values=rng.normal(size=(batch, length + 1)).astype(np.float32),
        terminated=rng.random((batch, length)) < 0.2,
        truncated=rng.random((batch, length)) < 0.2,
        mask=np.arange(length)[None, :] < rng.integers(1, length + 1,
                                                       (batch, 1)),
    )


# --------------------------------------------------------------------------
# Agreement with the NumPy reference loops.
# --------------------------------------------------------------------------


@PROPERTY
@given(traj=aft.trajectories(), seed=st.integers(0, 2**16),
       per_step=st.booleans(), with_mask=st.booleans())
def test_discounted_returns_matches_reference(traj, seed, per_step,
                                              with_mask):
    """discounted_returns equals np_discounted_returns (all layouts)."""
    _check_reference("returns", traj, seed, per_step, with_mask)


@PROPERTY
@given(traj=aft.trajectories(), seed=st.integers(0, 2**16),
       per_step=st.booleans(), with_mask=st.booleans())
def test_lambda_returns_matches_reference(traj, seed, per_step, with_mask):
    """lambda_returns equals np_lambda_returns (all layouts)."""
    _check_reference("lambda", traj, seed, per_step, with_mask)


@PROPERTY
@given(traj=aft.trajectories(), seed=st.integers(0, 2**16),
       per_step=st.booleans(), with_mask=st.booleans())
def test_gae_advantages_matches_reference(traj, seed, per_step, with_mask):
    """gae_advantages equals np_gae_advantages (all layouts)."""
    _check_reference("gae", traj, seed, per_step, with_mask)


def test_per_step_gamma_broadcasts_along_time():
    """A ``[T]`` gamma broadcasts over the batch like a full ``[B, T]`` one."""
    t = _random_batch(0)
    gamma_t = np.array([0.9, 0.5, 1.0, 0.0, 0.7, 0.3, 0.8], np.float32)
    full = np.broadcast_to(gamma_t, t["rewards"].shape)
    gae = jax.jit(lambda g: afn.gae_advantages(t["rewards"], t["values"],
                                               gamma=g, lambda_=0.9))
    a, b = gae(gamma_t), gae(full)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        a, aft.np_gae_advantages(t["rewards"], t["values"], full, 0.9),
        rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("length", [1, 2, 7, 20])
def test_reverse_linear_recurrence_matches_loop(method, length):
    """x_t = a_t + b_t x_{t+1} with x_T = 0, time on axis 0."""
    rng = np.random.default_rng(length)
    a = rng.normal(size=(length, 3)).astype(np.float32)
    b = rng.uniform(-1.0, 1.0, size=(length, 3)).astype(np.float32)
    expected = np.zeros((length, 3))
    nxt = np.zeros(3)
    for t in reversed(range(length)):
        nxt = a[t] + b[t] * nxt
        expected[t] = nxt
    solve = jax.jit(afn.reverse_linear_recurrence, static_argnames="method")
    out = solve(jnp.asarray(a), jnp.asarray(b), method=method)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Hand-computed cases.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_discounted_returns_hand_computed(method):
    """Small cases written out by hand."""
    r = jnp.array([1.0, 1.0, 1.0])
    flag = jnp.array([0, 1, 0])
    nv = jnp.array([10.0, 20.0, 30.0])

    def ret(**kw):
        return np.asarray(afn.discounted_returns(r, gamma=0.5, method=method,
                                                 **kw))

    np.testing.assert_allclose(ret(), [1.75, 1.5, 1.0])
    # s_2 terminal: G_1 = 1, G_0 = 1 + 0.5 * 1.
    np.testing.assert_allclose(ret(terminated=flag), [1.5, 1.0, 1.0])
    # Bootstrap after the last step: G_2 = 1 + 0.5 * 4, G_1 = 1 + 0.5 * 3.
    np.testing.assert_allclose(ret(bootstrap_value=jnp.float32(4.0)),
                               [2.25, 2.5, 3.0])
    # Truncated after step 1: G_2 = 1 + 0.5 * 30, G_1 = 1 + 0.5 * 20,
    # G_0 = 1 + 0.5 * 11.
    np.testing.assert_allclose(ret(truncated=flag, next_values=nv),
                               [6.5, 11.0, 16.0])
    # Truncation without next_values bootstraps from zero.
    np.testing.assert_allclose(ret(truncated=flag), [1.5, 1.0, 1.0])
    # Terminated and truncated at the same step: termination wins.
    np.testing.assert_allclose(
        ret(terminated=flag, truncated=flag, next_values=nv),
        [1.5, 1.0, 16.0])


@pytest.mark.parametrize("method", METHODS)
def test_gae_and_lambda_returns_hand_computed(method):
    """GAE and lambda-returns on written-out three-step examples."""
    r = jnp.array([1.0, 1.0, 1.0])
    v = jnp.array([0.0, 2.0, 4.0, 8.0])
    kw = dict(gamma=0.5, lambda_=0.5, method=method)
    flag = jnp.array([0, 1, 0])
    gae = lambda **k: np.asarray(afn.gae_advantages(r, v, **kw, **k))
    lam = lambda **k: np.asarray(afn.lambda_returns(r, v, **kw, **k))
    # TD errors: d0 = 1 + 1 - 0 = 2, d1 = 1 + 2 - 2 = 1, d2 = 1 + 4 - 4 = 1.
    # A2 = 1, A1 = 1 + 0.25 * 1 = 1.25, A0 = 2 + 0.25 * 1.25 = 2.3125.
    np.testing.assert_allclose(gae(), [2.3125, 1.25, 1.0])
    # G2 = 1 + 0.5 * 8, G1 = 1 + 0.5 * (0.5 * 4 + 0.5 * 5),
    # G0 = 1 + 0.5 * (0.5 * 2 + 0.5 * 3.25).
    np.testing.assert_allclose(lam(), [2.3125, 3.25, 5.0])
    # Truncated after step 1: A1 = d1 = 1 (bootstraps V(s_2) = 4), cut.
    np.testing.assert_allclose(gae(truncated=flag), [2.25, 1.0, 1.0])
    np.testing.assert_allclose(lam(truncated=flag), [2.25, 3.0, 5.0])
    # Terminated after step 1: d1 = 1 - 2 = -1, A0 = 2 + 0.25 * -1.
    np.testing.assert_allclose(gae(terminated=flag), [1.75, -1.0, 1.0])
    # G1 = 1, G0 = 1 + 0.5 * (0.5 * 2 + 0.5 * 1).
    np.testing.assert_allclose(lam(terminated=flag), [1.75, 1.0, 5.0])
    # Both flags at step 1: termination wins.
    np.testing.assert_allclose(gae(terminated=flag, truncated=flag),
                               [1.75, -1.0, 1.0])
    np.testing.assert_allclose(lam(terminated=flag, truncated=flag),
                               [1.75, 1.0, 5.0])
    # Truncation with next_values: d1 = 1 + 0.5 * 8 - 2 = 3, A1 = 3,
    # A0 = 2 + 0.25 * 3; d2 = 1 + 0.5 * 8 - 4 = 1.
    nv = jnp.array([2.0, 8.0, 8.0])
    np.testing.assert_allclose(gae(truncated=flag, next_values=nv),
                               [2.75, 3.0, 1.0])
    # G1 = 1 + 0.5 * 8, G0 = 1 + 0.5 * (0.5 * 2 + 0.5 * 5).
    np.testing.assert_allclose(lam(truncated=flag, next_values=nv),
                               [2.75, 5.0, 5.0])
    # Docstring examples.
    np.testing.assert_allclose(
        afn.lambda_returns(jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0, 4.0]),
                           gamma=1.0, lambda_=0.5, method=method), [4.0, 4.0])
    np.testing.assert_allclose(
        afn.gae_advantages(jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0, 4.0]),
                           gamma=1.0, lambda_=0.5, method=method), [4.0, 2.0])


def test_gae_length_t_values_with_bootstrap_value_hand_computed():
    """Length-T values take V(s_T) from ``bootstrap_value`` (else zero)."""
    r = jnp.array([[1.0, 1.0, 1.0]])
    v = jnp.array([[0.0, 2.0, 4.0]])
    out = afn.gae_advantages(r, v, gamma=0.5, lambda_=0.5,
                             bootstrap_value=jnp.array([8.0]))
    np.testing.assert_allclose(out, [[2.3125, 1.25, 1.0]])
    # d2 = 1 - 4 = -3, A1 = 1 + 0.25 * -3, A0 = 2 + 0.25 * 0.25.
    out = afn.gae_advantages(r, v, gamma=0.5, lambda_=0.5)
    np.testing.assert_allclose(out, [[2.0625, 0.25, -3.0]])


def test_masked_hand_computed():
    """Padding gives zero and cuts the recursion (bootstrap from values)."""
    r = jnp.array([1.0, 1.0, 1.0, 1.0])
    v = jnp.array([0.0, 2.0, 4.0, 6.0, 8.0])
    mask = jnp.array([1, 1, 0, 0])
    np.testing.assert_allclose(
        afn.discounted_returns(r, gamma=0.5, mask=mask), [1.5, 1.0, 0.0, 0.0])
    # d0 = 1 + 1 - 0 = 2, d1 = 1 + 2 - 2 = 1 (bootstraps V(s_2) = 4).
    np.testing.assert_allclose(
        afn.gae_advantages(r, v, gamma=0.5, lambda_=0.5, mask=mask),
        [2.25, 1.0, 0.0, 0.0])


def test_gamma_zero_and_one():
    """gamma = 0 gives rewards; gamma = 1 gives undiscounted suffix sums."""
    r = jnp.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(afn.discounted_returns(r, gamma=0.0), r)
    np.testing.assert_allclose(afn.discounted_returns(r, gamma=1.0),
                               [10.0, 9.0, 7.0, 4.0])


# --------------------------------------------------------------------------
# Properties.
# --------------------------------------------------------------------------


@PROPERTY
@given(traj=aft.trajectories(with_mask=False), seed=st.integers(0, 2**16))
def test_gae_lambda_zero_is_td_error(traj, seed):
    """GAE(lambda=0) is r_t + gamma (1 - d_t) V(s_{t+1}) - V(s_t)."""
    t = _canonical(traj, seed, per_step=True)
    t["lambda_"] = np.zeros_like(t["lambda_"])
    out = _outputs(t)
    v = t["values"].astype(np.float64)
    d = t["terminated"]
    td = t["rewards"] + t["gamma"] * (1.0 - d) * v[:, 1:] - v[:, :-1]
    for method in METHODS:
        np.testing.assert_allclose(out[method, "gae", "plus_one"], td,
                                   rtol=1e-5, atol=1e-4)


@PROPERTY
@given(traj=aft.trajectories(with_mask=False), seed=st.integers(0, 2**16))
def test_gae_lambda_one_is_monte_carlo_minus_values(traj, seed):
    """GAE(lambda=1) is the bootstrapped Monte-Carlo return minus V."""
    t = _canonical(traj, seed, per_step=True)
    t["lambda_"] = np.ones_like(t["lambda_"])
    v = t["values"]
    # Without truncation: returns bootstrapped from V(s_T).
    t["truncated"] = np.zeros_like(t["truncated"])
    out = _outputs(t)
    for method in METHODS:
        np.testing.assert_allclose(
            out[method, "gae", "plus_one"],
            out[method, "returns", "bootstrap"] - v[:, :-1],
            rtol=RTOL, atol=ATOL)
    # With truncation: returns bootstrap from V(s_{t+1}) where cut.
    t = _canonical(traj, seed, per_step=True)
    t["lambda_"] = np.ones_like(t["lambda_"])
    t["next_values"] = t["values"][:, 1:]
    out = _outputs(t)
    for method in METHODS:
        np.testing.assert_allclose(
            out[method, "gae", "plus_one"],
            out[method, "returns", "next_values"] - v[:, :-1],
            rtol=RTOL, atol=ATOL)


@PROPERTY
@given(traj=aft.trajectories(), seed=st.integers(0, 2**16),
       per_step=st.booleans())
def test_lambda_returns_equal_gae_plus_values(traj, seed, per_step):
    """lambda_returns == gae_advantages + V(s_t) on valid steps.

    This holds where the bootstrapped value is V(s_{t+1}), i.e. without a
    separate ``next_values``.
    """
    t = _canonical(traj, seed, per_step=per_step)
    out = _outputs(t)
    valid = t["mask"]
    v = t["values"][:, :-1]
    for method in METHODS:
        for layout in ("plus_one", "bootstrap"):
            lam_ret = out[method, "lambda", layout]
            adv = out[method, "gae", layout]
            np.testing.assert_allclose(lam_ret[valid], (adv + v)[valid],
                                       rtol=RTOL, atol=ATOL)
            assert np.all(lam_ret[~valid] == 0.0)
            assert np.all(adv[~valid] == 0.0)


@PROPERTY
@given(traj=aft.trajectories(with_mask=False), seed=st.integers(0, 2**16),
       per_step=st.booleans())
def test_returns_satisfy_bellman_recursion(traj, seed, per_step):
    """G_t = r_t + gamma_t (1 - d_t) G_{t+1} wherever the episode goes on."""
    t = _canonical(traj, seed, per_step=per_step)
    r, g = t["rewards"], t["gamma"]
    term, trunc = t["terminated"], t["truncated"]
    keep = ~trunc[:, :-1]
    out = _outputs(t)
    for method in METHODS:
        ret = out[method, "returns", "none"].astype(np.float64)
        rhs = r[:, :-1] + g[:, :-1] * (1.0 - term[:, :-1]) * ret[:, 1:]
        np.testing.assert_allclose(ret[:, :-1][keep], rhs[keep],
                                   rtol=RTOL, atol=ATOL)
        # The last step sees only its own reward without a bootstrap value.
        np.testing.assert_allclose(ret[:, -1], r[:, -1], rtol=1e-6,
                                   atol=1e-6)


@PROPERTY
@given(traj=aft.trajectories(), seed=st.integers(0, 2**16),
       a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_returns_are_linear_in_rewards(traj, seed, a, b):
    """returns(a r1 + b r2) == a returns(r1) + b returns(r2)."""
    t1 = _canonical(traj, seed)
    rng = np.random.default_rng(seed + 1)
    t2 = dict(t1, rewards=rng.normal(size=t1["rewards"].shape).astype(
        np.float32))
    t12 = dict(t1, rewards=(a * t1["rewards"] + b * t2["rewards"]).astype(
        np.float32))
    o1, o2, o12 = _outputs(t1), _outputs(t2), _outputs(t12)
    for method in METHODS:
        key = (method, "returns", "none")
        np.testing.assert_allclose(
            o12[key], a * o1[key].astype(np.float64) + b * o2[key],
            rtol=1e-4, atol=5e-3)


@PROPERTY
@given(traj=aft.trajectories(), seed=st.integers(0, 2**16),
       per_step=st.booleans())
def test_masked_equals_sliced(traj, seed, per_step):
    """A right-padded row equals the sliced row; padding gives exact zeros.

    Padded rewards, values after ``V(s_L)`` and padded next values are NaN;
    ``bootstrap_value`` is ``V(s_L)``, the value after the last valid step.
    """
    t = _canonical(traj, seed, per_step=per_step)
    lengths = [max(n for n in LENGTHS if n <= k) for k in t["mask"].sum(1)]
    horizon = t["rewards"].shape[1]
    t["mask"] = np.arange(horizon)[None, :] < np.array(lengths)[:, None]
    t["rewards"] = np.where(t["mask"], t["rewards"], np.nan).astype(
        np.float32)
    t["next_values"] = np.where(t["mask"], t["next_values"], np.nan).astype(
        np.float32)
    for i, n in enumerate(lengths):
        boot = t["values"][i, n]          # V(s_L), after the last valid step
        t["values"][i, n + 1:] = np.nan
        t["values"][i, -1] = boot         # the "bootstrap" layouts' value
    out = _outputs(t)
    for i, n in enumerate(lengths):
        row = {k: np.repeat(t[k][i:i + 1, :n], BATCH, axis=0)
               for k in ("rewards", "next_values", "gamma", "lambda_",
                         "terminated", "truncated", "mask")}
        row["values"] = np.repeat(t["values"][i:i + 1, :n + 1], BATCH, axis=0)
        sliced = _outputs(row)
        for key, got in out.items():
            assert np.all(got[i, n:] == 0.0), key
            np.testing.assert_allclose(got[i, :n], sliced[key][0], rtol=1e-5,
                                       atol=1e-4, err_msg=str(key))


@PROPERTY
@given(traj=aft.trajectories(), seed=st.integers(0, 2**16),
       per_step=st.booleans())
def test_scan_equals_associative(traj, seed, per_step):
    """Both methods agree within float tolerance."""
    out = _outputs(_canonical(traj, seed, per_step=per_step))
    for (method, name, layout), got in out.items():
        if method == "scan":
            np.testing.assert_allclose(
                got, out["associative", name, layout], rtol=RTOL, atol=ATOL)


def test_scan_equals_associative_long_horizon():
    """Long horizons agree between the methods; "auto" matches both."""
    rng = np.random.default_rng(3)
    r = jnp.asarray(rng.normal(size=(4, 200)).astype(np.float32))
    v = jnp.asarray(rng.normal(size=(4, 201)).astype(np.float32))
    term = jnp.asarray(rng.random((4, 200)) < 0.01)

    @jax.jit
    def f(r, v, term):
        kw = dict(gamma=0.99, lambda_=0.95, terminated=term)
        return [afn.gae_advantages(r, v, method=m, **kw)
                for m in ("scan", "associative", "auto")]

    scan, assoc, auto = f(r, v, term)
    np.testing.assert_allclose(scan, assoc, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(auto, scan, rtol=1e-4, atol=1e-4)
    ref = aft.np_gae_advantages(r, v, 0.99, 0.95, terminated=term)
    np.testing.assert_allclose(scan, ref, rtol=1e-4, atol=1e-4)


def test_batched_equals_vmap():
    """A [B, T] call equals jax.vmap of the per-row call."""
    t = _random_batch(21)
    args = (t["rewards"], t["values"], t["terminated"], t["truncated"],
            t["mask"])

    def fns(r, v, term, trunc, m):
        out = []
        for method in METHODS:
            kw = dict(gamma=0.9, terminated=term, truncated=trunc, mask=m,
                      method=method)
            out += [afn.gae_advantages(r, v, lambda_=0.8, **kw),
                    afn.lambda_returns(r, v, lambda_=0.8, **kw),
                    afn.discounted_returns(r, bootstrap_value=v[..., -1],
                                           **kw)]
        return out

    both = jax.jit(lambda *a: (jax.vmap(fns)(*a), fns(*a)))
    for got, want in zip(*both(*args)):
        assert got.shape == want.shape == t["rewards"].shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_time_axis_zero_on_transposed_input():
    """``time_axis=0`` on [T, B] inputs equals the default on [B, T]."""
    t = _random_batch(22)
    gamma = np.random.default_rng(0).uniform(size=t["rewards"].shape)
    nv = np.random.default_rng(1).normal(size=t["rewards"].shape)

    def fns(r, v, term, trunc, m, g, nv, time_axis):
        idx = (slice(None), -1) if time_axis == -1 else (-1, slice(None))
        out = []
        for method in METHODS:
            kw = dict(gamma=g, terminated=term, truncated=trunc, mask=m,
                      method=method, time_axis=time_axis)
            out += [afn.gae_advantages(r, v, lambda_=0.8, **kw),
                    afn.lambda_returns(r, v, lambda_=0.8, next_values=nv,
                                       **kw),
                    afn.discounted_returns(r, bootstrap_value=v[idx], **kw)]
        return out

    @jax.jit
    def both(*args):
        transposed = [a.T for a in args]
        return fns(*args, time_axis=-1), fns(*transposed, time_axis=0)

    args = (t["rewards"], t["values"], t["terminated"], t["truncated"],
            t["mask"], gamma, nv)
    default, transposed = both(*args)
    for got, want in zip(transposed, default):
        assert got.shape == want.T.shape
        np.testing.assert_allclose(got, np.asarray(want).T, rtol=1e-6,
                                   atol=1e-5)


def test_time_axis_middle_of_three_dims():
    """Time on a middle axis of a rank-3 input, with a [B, 1, C] gamma."""
    rng = np.random.default_rng(5)
    r = rng.normal(size=(2, 6, 3)).astype(np.float32)
    v = rng.normal(size=(2, 7, 3)).astype(np.float32)
    g = rng.uniform(size=(2, 1, 3)).astype(np.float32)
    out = afn.gae_advantages(r, v, gamma=g, lambda_=0.8, time_axis=1)
    ref = aft.np_gae_advantages(np.moveaxis(r, 1, -1), np.moveaxis(v, 1, -1),
                                np.moveaxis(g, 1, -1), 0.8)
    np.testing.assert_allclose(out, np.moveaxis(ref, -1, 1), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_jit_equals_eager(method):
    """jax.jit gives the eager result."""
    t = _random_batch(23)

    def fns(r, v, term, trunc, m):
        kw = dict(gamma=0.95, terminated=term, truncated=trunc, mask=m,
                  method=method)
        return (afn.gae_advantages(r, v, lambda_=0.9, **kw),
                afn.lambda_returns(r, v, lambda_=0.9, **kw),
                afn.discounted_returns(r, **kw))

    args = (t["rewards"], t["values"], t["terminated"], t["truncated"],
            t["mask"])
    eager = fns(*args)
    for got, want in zip(jax.jit(fns)(*args), eager):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # The eager results (scalar gamma and lambda_) match the references.
    kw = dict(gamma=0.95, terminated=t["terminated"],
              truncated=t["truncated"], mask=t["mask"])
    refs = (aft.np_gae_advantages(t["rewards"], t["values"], lambda_=0.9,
                                  **kw),
            aft.np_lambda_returns(t["rewards"], t["values"], lambda_=0.9,
                                  **kw),
            aft.np_discounted_returns(t["rewards"], **kw))
    for got, ref in zip(eager, refs):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_jit_compiles_once_for_same_shapes():
    """Repeated calls with the same shapes trace and compile once."""
    traces = []

    @jax.jit
    def f(r, v, term):
        traces.append(None)
        return afn.gae_advantages(r, v, gamma=0.99, lambda_=0.95,
                                  terminated=term)

    for seed in range(4):
        t = _random_batch(seed)
        f(t["rewards"], t["values"], t["terminated"])
    assert len(traces) == 1
    if hasattr(f, "_cache_size"):
        assert f._cache_size() == 1
    t = _random_batch(0, batch=2, length=9)
    f(t["rewards"], t["values"], t["terminated"])
    assert len(traces) == 2


# --------------------------------------------------------------------------
# Oracle: rlax.
# --------------------------------------------------------------------------


@jax.jit
def _rlax_outputs(r, v, discount, lambda_):
    import rlax

    return {
        "returns": jax.vmap(rlax.discounted_returns)(r, discount, v[:, -1]),
        "gae": jax.vmap(rlax.truncated_generalized_advantage_estimation,
                        in_axes=(0, 0, None, 0))(r, discount, lambda_, v),
        "lambda": jax.vmap(rlax.lambda_returns, in_axes=(0, 0, 0, None))(
            r, discount, v[:, 1:], lambda_),
    }


@PROPERTY
@given(traj=aft.trajectories(with_mask=False))
def test_matches_rlax(traj):
    """Agreement with rlax (discount_t = gamma (1 - terminated))."""
    t = _canonical(traj, 0)
    t["truncated"] = np.zeros_like(t["truncated"])
    discount = (t["gamma"] * (1.0 - t["terminated"])).astype(np.float32)
    theirs = _rlax_outputs(t["rewards"], t["values"], discount,
                           np.float32(traj["lambda_"]))
    ours = _outputs(t)
    for method in METHODS:
        np.testing.assert_allclose(ours[method, "returns", "bootstrap"],
                                   theirs["returns"], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(ours[method, "gae", "plus_one"],
                                   theirs["gae"], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(ours[method, "lambda", "plus_one"],
                                   theirs["lambda"], rtol=RTOL, atol=ATOL)


def test_matches_rlax_scalar_parameters():
    """Agreement with rlax with scalar gamma and lambda_."""
    t = _random_batch(31)
    r, v, term = t["rewards"], t["values"], t["terminated"]
    discount = (0.9 * (1.0 - term)).astype(np.float32)
    theirs = _rlax_outputs(r, v, discount, np.float32(0.8))
    kw = dict(gamma=0.9, terminated=term)
    np.testing.assert_allclose(
        afn.discounted_returns(r, bootstrap_value=v[:, -1], **kw),
        theirs["returns"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(afn.gae_advantages(r, v, lambda_=0.8, **kw),
                               theirs["gae"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(afn.lambda_returns(r, v, lambda_=0.8, **kw),
                               theirs["lambda"], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Gradients.
# --------------------------------------------------------------------------


def test_check_grads():
    """Forward- and reverse-mode derivatives match finite differences."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        r = jnp.asarray(rng.normal(size=(2, 5)))
        v = jnp.asarray(rng.normal(size=(2, 6)))
        gamma = jnp.asarray(rng.uniform(0.5, 1.0, size=(2, 5)))
        term = jnp.array([[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]])
        trunc = jnp.array([[0, 0, 0, 0, 0], [0, 1, 0, 0, 0]])
        mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])

        @jax.jit
        def f(r, v, gamma):
            kw = dict(gamma=gamma, lambda_=0.8, terminated=term,
                      truncated=trunc, mask=mask, stop_target_gradients=False)
            return (afn.gae_advantages(r, v, method="scan", **kw),
                    afn.lambda_returns(r, v, method="associative", **kw))

        check_grads(f, (r, v, gamma), order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize("method", METHODS)
def test_gae_jacobian_wrt_rewards(method):
    """dA_t / dr_k = (gamma lambda)^(k - t) for k >= t, else 0."""
    v = jnp.zeros(6)
    jac = jax.jit(jax.jacrev(lambda r: afn.gae_advantages(
        r, v, gamma=0.9, lambda_=0.5, method=method,
        stop_target_gradients=False)))(jnp.zeros(5))
    t = np.arange(5)
    k = t[None, :] - t[:, None]
    expected = np.where(k >= 0, 0.45 ** np.maximum(k, 0), 0.0)
    np.testing.assert_allclose(jac, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_td_error_jacobian_wrt_values(method):
    """With lambda = 0, dA_t/dV is -1 at t and gamma at t + 1."""
    jac = jax.jit(jax.jacrev(lambda v: afn.gae_advantages(
        jnp.zeros(4), v, gamma=0.9, lambda_=0.0, method=method,
        stop_target_gradients=False)))(jnp.zeros(5))
    expected = np.zeros((4, 5))
    expected[np.arange(4), np.arange(4)] = -1.0
    expected[np.arange(4), np.arange(1, 5)] = 0.9
    np.testing.assert_allclose(jac, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_stop_target_gradients_default(method):
    """By default the results are constant targets: zero gradients."""
    t = _random_batch(1)
    w = jnp.asarray(np.random.default_rng(2).normal(size=(3, 7)))

    def loss(r, v):
        kw = dict(gamma=0.9, method=method, terminated=t["terminated"])
        return jnp.sum(w * (afn.gae_advantages(r, v, lambda_=0.9, **kw)
                            + afn.lambda_returns(r, v, lambda_=0.9, **kw)
                            + afn.discounted_returns(r, **kw)))

    g_r, g_v = jax.jit(jax.grad(loss, argnums=(0, 1)))(
        jnp.asarray(t["rewards"]), jnp.asarray(t["values"]))
    assert np.all(np.asarray(g_v) == 0.0)
    assert np.all(np.asarray(g_r) == 0.0)


def test_masked_gradient_ignores_nan_padding():
    """NaN in padded rewards does not leak into gradients."""
    r = jnp.array([1.0, 2.0, jnp.nan, jnp.nan])
    v = jnp.full((5,), 0.5)
    mask = jnp.array([1, 1, 0, 0])
    g = jax.jit(jax.grad(lambda r: jnp.sum(afn.gae_advantages(
        r, v, gamma=0.9, lambda_=0.9, mask=mask,
        stop_target_gradients=False))))(r)
    np.testing.assert_allclose(g, [1.0, 1.81, 0.0, 0.0], rtol=1e-6)


# --------------------------------------------------------------------------
# Dtypes.
# --------------------------------------------------------------------------


def test_float64():
    """float64 inputs give float64 outputs matching the reference to 1e-10."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        r = jnp.asarray(rng.normal(size=(3, 12)))
        v = jnp.asarray(rng.normal(size=(3, 13)))
        term = jnp.asarray(rng.random((3, 12)) < 0.2)
        trunc = jnp.asarray(rng.random((3, 12)) < 0.2)
        mask = jnp.asarray(np.arange(12)[None] < np.array([[12], [7], [1]]))
        kw = dict(gamma=0.97, terminated=term, truncated=trunc, mask=mask)

        @jax.jit
        def fns(r, v):
            return [(afn.gae_advantages(r, v, lambda_=0.9, method=m, **kw),
                     afn.lambda_returns(r, v, lambda_=0.9, method=m, **kw),
                     afn.discounted_returns(r, bootstrap_value=v[:, -1],
                                            method=m, **kw))
                    for m in METHODS]

        refs = (aft.np_gae_advantages(r, v, lambda_=0.9, **kw),
                aft.np_lambda_returns(r, v, lambda_=0.9, **kw),
                aft.np_discounted_returns(r, bootstrap_value=v[:, -1], **kw))
        for outs in fns(r, v):
            for got, ref in zip(outs, refs):
                assert got.dtype == jnp.float64
                np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)


def test_bfloat16():
    """bfloat16 inputs give finite bfloat16 outputs near the float32 ones."""
    rng = np.random.default_rng(8)
    r = jnp.asarray(rng.normal(size=(3, 10)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(3, 11)), jnp.bfloat16)
    term = jnp.asarray(rng.random((3, 10)) < 0.2)

    @jax.jit
    def fns(r, v):
        out = []
        for m in METHODS:
            kw = dict(gamma=0.95, terminated=term, method=m)
            out += [afn.gae_advantages(r, v, lambda_=0.9, **kw),
                    afn.lambda_returns(r, v, lambda_=0.9, **kw),
                    afn.discounted_returns(r, bootstrap_value=v[:, -1], **kw)]
        return out

    low = fns(r, v)
    full = fns(r.astype(jnp.float32), v.astype(jnp.float32))
    for got, want in zip(low, full):
        assert got.dtype == jnp.bfloat16
        assert want.dtype == jnp.float32
        got = np.asarray(got, np.float32)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


def test_python_scalar_bootstrap_keeps_rewards_dtype():
    """A Python float bootstrap_value does not change the output dtype."""
    out = afn.discounted_returns(jnp.ones(3, jnp.bfloat16), gamma=0.5,
                                 bootstrap_value=1.0)
    assert out.dtype == jnp.bfloat16


def test_integer_and_bool_inputs_give_float32():
    """Integer rewards and boolean flags compute in float32."""
    out = afn.discounted_returns(jnp.array([1, 1, 1]), gamma=0.5,
                                 terminated=jnp.array([False, True, False]))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, [1.5, 1.0, 1.0])


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------


_R = np.zeros((2, 4), np.float32)
_V = np.zeros((2, 5), np.float32)
_GL = dict(gamma=0.9, lambda_=0.9)


@pytest.mark.parametrize("call, match", [
    (lambda: afn.gae_advantages(_R, np.zeros((2, 3)), **_GL), "values"),
    (lambda: afn.lambda_returns(_R, np.zeros((2, 6)), **_GL), "values"),
    (lambda: afn.gae_advantages(_R, np.zeros((3, 5)), **_GL), "values"),
    (lambda: afn.gae_advantages(_R, _V, mask=np.ones((2, 3)), **_GL),
     "mask"),
    (lambda: afn.discounted_returns(_R, gamma=0.9, mask=np.ones((3, 4))),
     "mask"),
    (lambda: afn.discounted_returns(_R, gamma=0.9,
                                    terminated=np.zeros((2, 5))),
     "terminated"),
    (lambda: afn.gae_advantages(_R, _V, terminated=np.zeros((3, 1)), **_GL),
     "terminated"),
    (lambda: afn.gae_advantages(_R, _V, truncated=np.zeros((3,)), **_GL),
     "truncated"),
    (lambda: afn.discounted_returns(np.float32(1.0), gamma=0.9), "rewards"),
    (lambda: afn.gae_advantages(np.float32(1.0), np.float32(1.0), **_GL),
     "rewards"),
    (lambda: afn.discounted_returns(_R, gamma=0.9, method="parallel"),
     "method"),
    (lambda: afn.gae_advantages(_R, _V, method="fast", **_GL), "method"),
    (lambda: afn.reverse_linear_recurrence(jnp.zeros(3), jnp.zeros(3),
                                           method="serial"), "method"),
    (lambda: afn.gae_advantages(_R, _V, bootstrap_value=np.zeros(2), **_GL),
     "bootstrap_value"),
    (lambda: afn.lambda_returns(_R, _V, bootstrap_value=np.zeros(2), **_GL),
     "bootstrap_value"),
    (lambda: afn.lambda_returns(_R, _V[:, :-1], next_values=_R,
                                bootstrap_value=np.zeros(2), **_GL),
     "next_values"),
    (lambda: afn.discounted_returns(_R, gamma=0.9, next_values=_R,
                                    bootstrap_value=np.zeros(2)),
     "bootstrap_value"),
    (lambda: afn.discounted_returns(_R, gamma=0.9,
                                    bootstrap_value=np.zeros(3)),
     "bootstrap_value"),
    (lambda: afn.discounted_returns(_R, gamma=0.9, next_values=np.zeros(5)),
     "next_values"),
    (lambda: afn.discounted_returns(_R, gamma=np.ones(3)), "gamma"),
    (lambda: afn.gae_advantages(_R, _V, gamma=0.9, lambda_=np.ones((3, 4))),
     "lambda_"),
    (lambda: afn.discounted_returns(_R, gamma=0.9, time_axis=2),
     "time_axis"),
])
def test_bad_input_raises(call, match):
    """Invalid arguments raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------
# Degenerate but legal inputs.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_step_terminated(method):
    """With every step terminal, returns are rewards and GAE is r - V."""
    t = _random_batch(4)
    r, v = t["rewards"], t["values"]
    kw = dict(gamma=0.9, terminated=np.ones_like(r, bool), method=method)
    np.testing.assert_allclose(
        afn.discounted_returns(r, bootstrap_value=v[:, -1], **kw), r,
        rtol=1e-6)
    np.testing.assert_allclose(afn.gae_advantages(r, v, lambda_=0.9, **kw),
                               r - v[:, :-1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(afn.lambda_returns(r, v, lambda_=0.9, **kw), r,
                               rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_all_masked_row_gives_zeros(method):
    """A row with no valid step gives exact, finite zeros."""
    t = _random_batch(5)
    r, v = t["rewards"].copy(), t["values"]
    r[1] = np.nan
    mask = np.ones_like(r, bool)
    mask[1] = False
    kw = dict(gamma=0.9, terminated=t["terminated"], mask=mask,
              method=method)
    outs = [np.asarray(o) for o in (
        afn.discounted_returns(r, **kw),
        afn.gae_advantages(r, v, lambda_=0.9, **kw),
        afn.lambda_returns(r, v, lambda_=0.9, **kw))]
    for out in outs:
        assert np.all(out[1] == 0.0)
        assert np.all(np.isfinite(out))
    np.testing.assert_allclose(
        outs[1][[0, 2]],
        aft.np_gae_advantages(r[[0, 2]], v[[0, 2]], 0.9, 0.9,
                              terminated=t["terminated"][[0, 2]]),
        rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_length_one_trajectories(method):
    """T = 1 gives one-step targets."""
    r = jnp.array([[1.0], [2.0]])
    v = jnp.array([[0.5, 3.0], [1.0, 4.0]])
    kw = dict(gamma=0.5, method=method)
    # A = r + 0.5 V(s_1) - V(s_0); G = r + 0.5 V(s_1).
    np.testing.assert_allclose(afn.gae_advantages(r, v, lambda_=0.7, **kw),
                               [[2.0], [3.0]])
    np.testing.assert_allclose(afn.lambda_returns(r, v, lambda_=0.7, **kw),
                               [[2.5], [4.0]])
    np.testing.assert_allclose(
        afn.discounted_returns(r, bootstrap_value=v[:, -1], **kw),
        [[2.5], [4.0]])
    np.testing.assert_allclose(
        afn.gae_advantages(r, v, lambda_=0.7,
                           terminated=jnp.array([[True], [False]]), **kw),
        [[0.5], [3.0]])
    np.testing.assert_allclose(afn.discounted_returns(jnp.array([3.0]), **kw),
                               [3.0])


@pytest.mark.parametrize("batch,length,layout", [
    (3, 40, ("column", 3)),       # few rows: time slices read in place
    (24, 30, ("column", 8)),      # groups of 8 rows
    (12, 1024, ("column", 4)),    # 4 KiB rows: groups of 4 rows
    (30, 24, ("column", 10)),     # groups of another divisor near 8
    (17, 24, ("time_major", None)),  # no group size divides: transposed
])
def test_gae_cpu_layouts(batch, length, layout):
    """Every CPU layout of the sequential scan matches the reference, with
    masks (NaN in the padding), per-step gamma, terminations and truncations,
    ``T + 1`` values, ``bootstrap_value`` and ``next_values``; gradients
    stay finite."""
    from artifex_fn._src import multistep
    if jax.default_backend() == "cpu":
        assert multistep._cpu_layout((batch, length), 1, 4) == layout
    rng = np.random.default_rng(batch)
    shape = (batch, length)
    r = rng.normal(size=shape).astype(np.float32)
    v = rng.normal(size=(batch, length + 1)).astype(np.float32)
    nv = rng.normal(size=shape).astype(np.float32)
    g = rng.uniform(0.5, 1.0, size=shape).astype(np.float32)
    term = rng.random(shape) < 0.05
    trunc = rng.random(shape) < 0.05
    valid = rng.integers(1, length + 1, size=batch)
    mask = np.arange(length)[None] < valid[:, None]
    for i, n in enumerate(valid):
        r[i, n:] = np.nan
        v[i, n + 1:] = np.nan
        nv[i, n:] = np.nan
    kw = dict(gamma=g, lambda_=0.9, terminated=term, truncated=trunc,
              mask=mask)
    cases = (
        (v, {}),
        (v[:, :-1], dict(bootstrap_value=np.where(valid == length, v[:, -1],
                                                  0.0))),
        (v[:, :-1], dict(next_values=nv)),
    )
    for values, extra in cases:
        got = jax.jit(lambda r, values: afn.gae_advantages(
            r, values, method="scan", **kw, **extra))(r, values)
        want = aft.np_gae_advantages(r, values, **kw, **extra)
        np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL,
                                   atol=ATOL)
        assert np.all(np.asarray(got)[~mask] == 0)
        got = jax.jit(lambda r, values: afn.lambda_returns(
            r, values, method="scan", **kw, **extra))(r, values)
        want = aft.np_lambda_returns(r, values, **kw, **extra)
        np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL,
                                   atol=ATOL)
    kw_ret = dict(gamma=g, terminated=term, truncated=trunc, mask=mask,
                  next_values=nv)
    got = jax.jit(lambda r: afn.discounted_returns(
        r, method="scan", **kw_ret))(r)
    np.testing.assert_allclose(
        np.asarray(got), aft.np_discounted_returns(r, **kw_ret), rtol=RTOL,
        atol=ATOL)
    grad = jax.grad(lambda r, values: jnp.sum(afn.gae_advantages(
        r, values, method="scan", stop_target_gradients=False, **kw)),
        argnums=(0, 1))(r, v)
    for x in grad:
        assert np.all(np.isfinite(np.asarray(x)))
