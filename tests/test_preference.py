"""Tests for the DPO-family and SimPO preference losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import artifex_fn as afn
from artifex_fn import testing as aft

# Jitted entry points: one compilation per input signature.
_dpo_loss = jax.jit(afn.dpo_loss, static_argnames="loss_type")
_simpo_loss = jax.jit(afn.simpo_loss, static_argnames="loss_type")

_LOG2 = math.log(2.0)


def _dpo_args(pairs):
    return [jnp.asarray(pairs[k]) for k in (
        "chosen_log_probs", "rejected_log_probs", "ref_chosen_log_probs",
        "ref_rejected_log_probs")]


@jax.jit
def _all_dpo(args, beta, smoothing, robust_smoothing):
    out = {lt: _dpo_loss(*args, beta=beta, loss_type=lt,
                         label_smoothing=smoothing)
           for lt in ("sigmoid", "ipo", "hinge")}
    out["robust"] = _dpo_loss(*args, beta=beta, loss_type="robust",
                              label_smoothing=robust_smoothing)
    return out


@settings(max_examples=50, deadline=None)
@given(aft.preference_pairs(max_batch=4), st.floats(0.01, 2.0),
       st.floats(0.0, 1.0))
def test_dpo_matches_reference(pairs, beta, smoothing):
    """Loss and implicit rewards equal the NumPy reference, every type."""
    robust_smoothing = 0.45 * smoothing   # rDPO needs label_smoothing < 0.5
    outs = _all_dpo(_dpo_args(pairs), beta, smoothing, robust_smoothing)
    for loss_type, out in outs.items():
        eps = robust_smoothing if loss_type == "robust" else smoothing
        loss, chosen, rejected = aft.np_dpo_loss(
            pairs["chosen_log_probs"], pairs["rejected_log_probs"],
            pairs["ref_chosen_log_probs"], pairs["ref_rejected_log_probs"],
            beta=beta, loss_type=loss_type, label_smoothing=eps)
        assert isinstance(out, afn.PreferenceLoss)
        assert out.loss.shape == loss.shape
        assert out.loss.dtype == jnp.float32
        np.testing.assert_allclose(out.loss, loss, rtol=1e-4, atol=1e-3,
                                   err_msg=loss_type)
        np.testing.assert_allclose(out.chosen_rewards, chosen, rtol=1e-5,
                                   atol=1e-4)
        np.testing.assert_allclose(out.rejected_rewards, rejected,
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_dpo_equal_log_ratios_give_log_two(smoothing):
    """h = 0 gives -log sigmoid(0) = log 2, with or without smoothing."""
    out = _dpo_loss(jnp.array([-3.0, -10.0]), jnp.array([-7.0, -4.0]),
                    jnp.array([-5.0, -12.0]), jnp.array([-9.0, -6.0]),
                    beta=0.3, label_smoothing=smoothing)
    np.testing.assert_allclose(out.loss, [_LOG2, _LOG2], rtol=1e-6)
    np.testing.assert_allclose(out.chosen_rewards, [0.6, 0.6], rtol=1e-5)
    np.testing.assert_allclose(out.rejected_rewards, [0.6, 0.6], rtol=1e-5)
    robust = _dpo_loss(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1),
                       jnp.zeros(1), loss_type="robust",
                       label_smoothing=smoothing)
    # rDPO at h = 0: (1 - 2 eps) log 2 / (1 - 2 eps) = log 2.
    np.testing.assert_allclose(robust.loss, [_LOG2], rtol=1e-6)


def test_dpo_hand_values():
    """One pair, every loss type, h = beta * (rho_w - rho_l) = 0.1 * 2."""
    args = [jnp.array([-4.0]), jnp.array([-6.0]), jnp.array([-5.0]),
            jnp.array([-5.0])]
    h = 0.2
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))
    expected = {
        "sigmoid": -math.log(sig(h)),
        "ipo": (2.0 - 5.0) ** 2,
        "hinge": 1.0 - h,
        "robust": (-0.8 * math.log(sig(h)) + 0.2 * math.log(sig(-h))) / 0.6,
    }
    for loss_type, value in expected.items():
        smoothing = 0.2 if loss_type == "robust" else 0.0
        out = _dpo_loss(*args, beta=0.1, loss_type=loss_type,
                        label_smoothing=smoothing)
        np.testing.assert_allclose(out.loss, [value], rtol=1e-5,
                                   err_msg=loss_type)
    cdpo = _dpo_loss(*args, beta=0.1, label_smoothing=0.25)
    np.testing.assert_allclose(
        cdpo.loss, [-0.75 * math.log(sig(h)) - 0.25 * math.log(sig(-h))],
        rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_dpo_loss_decreases_with_chosen_margin(loss_type):
    """A larger chosen log-prob (larger margin) never increases the loss."""
    chosen = jnp.linspace(-20.0, 20.0, 41)
    n = chosen.shape[0]
    out = _dpo_loss(chosen, jnp.full(n, -5.0), jnp.zeros(n),
                    jnp.full(n, -5.0), beta=0.1, loss_type=loss_type)
    diffs = np.diff(np.asarray(out.loss))
    assert np.all(diffs <= 0.0)
    if loss_type == "sigmoid":
        assert np.all(diffs < 0.0)
    else:
        # Hinge: strictly decreasing until h = 1 (chosen = 10), then zero.
        margin = np.asarray(chosen)
        assert np.all(diffs[margin[1:] <= 10.0] < 0.0)
        np.testing.assert_allclose(np.asarray(out.loss)[margin >= 10.0], 0.0,
                                   atol=1e-6)


def test_dpo_gradients():
    """dL/d chosen = -beta sigmoid(-h); references and rewards carry none."""
    beta = 0.5
    pc = jnp.array([-3.0, -8.0, -1.0])
    pr = jnp.array([-4.0, -2.0, -6.0])
    rc = jnp.array([-3.5, -7.0, -2.0])
    rr = jnp.array([-4.5, -3.0, -2.0])
    h = beta * ((pc - rc) - (pr - rr))
    sig_neg_h = 1.0 / (1.0 + np.exp(np.asarray(h)))

    def total(*args):
        return jnp.sum(_dpo_loss(*args, beta=beta).loss)

    g = jax.jit(jax.grad(total, argnums=(0, 1, 2, 3)))(pc, pr, rc, rr)
    np.testing.assert_allclose(g[0], -beta * sig_neg_h, rtol=1e-5)
    np.testing.assert_allclose(g[1], beta * sig_neg_h, rtol=1e-5)
    np.testing.assert_array_equal(g[2], np.zeros(3))
    np.testing.assert_array_equal(g[3], np.zeros(3))

    def rewards(x):
        out = _dpo_loss(x, pr, rc, rr, beta=beta)
        return jnp.sum(out.chosen_rewards) + jnp.sum(out.rejected_rewards)

    np.testing.assert_array_equal(jax.grad(rewards)(pc), np.zeros(3))
    out = _dpo_loss(pc, pr, rc, rr, beta=beta)
    np.testing.assert_allclose(out.chosen_rewards, beta * (pc - rc),
                               rtol=1e-6)
    np.testing.assert_allclose(out.rejected_rewards, beta * (pr - rr),
                               rtol=1e-6)


def test_ipo_minimum_at_target_margin():
    """IPO is zero, with zero gradient, at rho_w - rho_l = 1 / (2 beta)."""
    beta = 0.25
    target = 1.0 / (2.0 * beta)   # 2.0
    f = lambda c: _dpo_loss(c, jnp.array([-5.0]), jnp.array([-3.0]),
                            jnp.array([-5.0]), beta=beta,
                            loss_type="ipo").loss
    at = jnp.array([-3.0 + target])
    np.testing.assert_allclose(f(at), [0.0], atol=1e-10)
    np.testing.assert_allclose(jax.grad(lambda c: f(c)[0])(at), [0.0],
                               atol=1e-6)
    for delta in (-0.5, 0.5):
        np.testing.assert_allclose(f(at + delta), [0.25], rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(aft.preference_pairs(max_batch=4), st.floats(0.1, 3.0),
       st.floats(-2.0, 2.0), st.floats(0.0, 1.0))
def test_simpo_matches_reference(pairs, beta, margin, smoothing):
    """SimPO loss and rewards equal the NumPy reference."""
    out = _simpo_loss(jnp.asarray(pairs["chosen_log_probs"]),
                      jnp.asarray(pairs["rejected_log_probs"]),
                      jnp.asarray(pairs["chosen_lengths"]),
                      jnp.asarray(pairs["rejected_lengths"]),
                      beta=beta, margin=margin, label_smoothing=smoothing)
    loss, chosen, rejected = aft.np_simpo_loss(
        pairs["chosen_log_probs"], pairs["rejected_log_probs"],
        pairs["chosen_lengths"], pairs["rejected_lengths"], beta=beta,
        margin=margin, label_smoothing=smoothing)
    np.testing.assert_allclose(out.loss, loss, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.chosen_rewards, chosen, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(out.rejected_rewards, rejected, rtol=1e-5,
                               atol=1e-5)


def test_simpo_uses_per_token_average():
    """Doubling a response's log-prob sum and length changes nothing."""
    pc, pr = jnp.array([-6.0, -3.0]), jnp.array([-12.0, -1.0])
    lc, lr = jnp.array([3, 5]), jnp.array([4, 1])
    a = _simpo_loss(pc, pr, lc, lr, beta=2.0, margin=0.5)
    b = _simpo_loss(2 * pc, 3 * pr, 2 * lc, 3 * lr, beta=2.0, margin=0.5)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-6)
    np.testing.assert_allclose(a.chosen_rewards, [-4.0, -1.2], rtol=1e-6)
    np.testing.assert_allclose(a.rejected_rewards, [-6.0, -2.0], rtol=1e-6)
    # Without length normalisation the losses would differ.
    c = _simpo_loss(2 * pc, 3 * pr, lc, lr, beta=2.0, margin=0.5)
    assert not np.allclose(a.loss, c.loss)


def test_simpo_margin_shifts_the_loss():
    """loss(margin) = -log sigmoid(r_w - r_l - margin)."""
    pc, pr = jnp.array([-2.0]), jnp.array([-6.0])
    lc, lr = jnp.array([2]), jnp.array([3])
    # r_w = -1, r_l = -2 with beta = 1: reward difference 1.
    for margin in (0.0, 0.5, 1.0, 3.0):
        out = _simpo_loss(pc, pr, lc, lr, beta=1.0, margin=margin)
        np.testing.assert_allclose(
            out.loss, [math.log1p(math.exp(-(1.0 - margin)))], rtol=1e-6)
    at_margin = _simpo_loss(pc, pr, lc, lr, beta=1.0, margin=1.0)
    np.testing.assert_allclose(at_margin.loss, [_LOG2], rtol=1e-6)
    hinge = _simpo_loss(pc, pr, lc, lr, beta=1.0, margin=0.5,
                        loss_type="hinge")
    np.testing.assert_allclose(hinge.loss, [0.5], rtol=1e-6)
    # Lengths below one count as one.
    zero_len = _simpo_loss(pc, pr, jnp.array([0]), jnp.array([1]),
                           beta=1.0, margin=0.0)
    np.testing.assert_allclose(zero_len.chosen_rewards, [-2.0])


def test_argument_validation():
    """Out-of-range hyper-parameters and bad shapes raise naming the field."""
    z = jnp.zeros(3)
    for beta in (0.0, -1.0):
        with pytest.raises(ValueError, match="beta"):
            afn.dpo_loss(z, z, z, z, beta=beta)
        with pytest.raises(ValueError, match="beta"):
            afn.simpo_loss(z, z, z, z, beta=beta)
    with pytest.raises(ValueError, match="label_smoothing"):
        afn.dpo_loss(z, z, z, z, label_smoothing=1.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        afn.dpo_loss(z, z, z, z, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        afn.dpo_loss(z, z, z, z, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        afn.simpo_loss(z, z, z, z, label_smoothing=2.0)
    with pytest.raises(ValueError, match="loss_type"):
        afn.dpo_loss(z, z, z, z, loss_type="kto")
    with pytest.raises(ValueError, match="loss_type"):
        afn.simpo_loss(z, z, z, z, loss_type="ipo")
    with pytest.raises(ValueError, match="rejected_log_probs"):
        afn.dpo_loss(z, jnp.zeros(2), z, z)
    with pytest.raises(ValueError, match="ref_rejected_log_probs"):
        afn.dpo_loss(z, z, z, jnp.zeros((3, 1)))
    with pytest.raises(ValueError, match="rejected_lengths"):
        afn.simpo_loss(z, z, z, jnp.zeros(2))
    with pytest.raises(ValueError, match="chosen_lengths"):
        afn.simpo_loss(z, z, jnp.zeros(2), jnp.zeros(2))
    # Boundary values are accepted.
    afn.dpo_loss(z, z, z, z, label_smoothing=1.0)
    afn.dpo_loss(z, z, z, z, loss_type="robust", label_smoothing=0.0)


def test_jit_and_vmap_over_beta():
    """beta may be traced: jit and vmap over it give the eager values."""
    pc, pr = jnp.array([-1.0, -3.0]), jnp.array([-2.0, -1.0])
    rc, rr = jnp.array([-1.5, -2.0]), jnp.array([-1.5, -2.0])
    betas = jnp.array([0.1, 0.5])
    for loss_type in ("sigmoid", "ipo", "hinge"):
        vm = jax.vmap(lambda b, lt=loss_type: _dpo_loss(
            pc, pr, rc, rr, beta=b, loss_type=lt).loss)(betas)
        assert vm.shape == (2, 2)
        for i, b in enumerate((0.1, 0.5)):
            eager = afn.dpo_loss(pc, pr, rc, rr, beta=b,
                                 loss_type=loss_type).loss
            np.testing.assert_allclose(vm[i], eager, rtol=1e-6)
    jitted = jax.jit(lambda b: _dpo_loss(pc, pr, rc, rr, beta=b))(0.5)
    eager = afn.dpo_loss(pc, pr, rc, rr, beta=0.5)
    for a, b in zip(jitted, eager):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    simpo = jax.vmap(lambda b: _simpo_loss(
        pc, pr, jnp.array([1, 2]), jnp.array([2, 1]), beta=b).loss)(betas)
    np.testing.assert_allclose(
        simpo[1], afn.simpo_loss(pc, pr, jnp.array([1, 2]),
                                 jnp.array([2, 1]), beta=0.5).loss,
        rtol=1e-6)


def test_dtypes():
    """float64 stays float64; bfloat16 gives finite bfloat16 losses."""
    with jax.enable_x64(True):
        x = jnp.array([-1.0, -2.0], jnp.float64)
        out = _dpo_loss(x, x - 1e-9, x, x)
        assert out.loss.dtype == jnp.float64
        np.testing.assert_allclose(
            out.loss, np.log1p(np.exp(-0.1 * 1e-9)), rtol=1e-12)
    b = jnp.array([-100.0, -3.0], jnp.bfloat16)
    out = _dpo_loss(b, b - 50, b, b, beta=1.0)
    assert out.loss.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(out.loss, np.float32)))
