"""Preference-optimisation losses on per-sequence log-probabilities.

Inputs are log-probability *sums* of whole responses (see
:func:`artifex_fn.sequence_log_probs`) and, for SimPO, response lengths.
With the policy-to-reference log-ratios
:math:`\\rho_w = \\log\\pi_\\theta(y_w|x) - \\log\\pi_{ref}(y_w|x)` (chosen)
and :math:`\\rho_l` (rejected), and :math:`h = \\beta(\\rho_w - \\rho_l)`:

* ``"sigmoid"`` (DPO, Rafailov et al. 2023, eq. 7; with label smoothing
  :math:`\\epsilon` the conservative cDPO of Mitchell 2023):
  :math:`-(1-\\epsilon)\\log\\sigma(h) - \\epsilon\\log\\sigma(-h)`;
* ``"ipo"`` (Azar et al. 2023, eq. 17):
  :math:`(\\rho_w - \\rho_l - \\frac{1}{2\\beta})^2`;
* ``"hinge"`` (SLiC, Zhao et al. 2023): :math:`\\max(0, 1 - h)`;
* ``"robust"`` (Chowdhury et al. 2024, rDPO, eq. 8):
  :math:`\\frac{-(1-\\epsilon)\\log\\sigma(h) + \\epsilon\\log\\sigma(-h)}
  {1 - 2\\epsilon}`;
* SimPO (Meng et al. 2024, eq. 6), reference-free and length-normalised:
  :math:`-\\log\\sigma(\\frac{\\beta}{|y_w|}\\log\\pi_\\theta(y_w|x) -
  \\frac{\\beta}{|y_l|}\\log\\pi_\\theta(y_l|x) - m)` with the target
  margin :math:`m` (the paper's :math:`\\gamma`).

Each returns unreduced per-pair losses and the implicit rewards
(:math:`\\beta\\rho` for DPO, :math:`\\frac{\\beta}{|y|}\\log\\pi_\\theta(y|x)`
for SimPO), the latter without gradient, for metrics.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from artifex_fn._src import checks

PreferenceLossType = Literal["sigmoid", "ipo", "hinge", "robust"]
PREFERENCE_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


class PreferenceLoss(NamedTuple):
    """Per-pair preference loss and implicit rewards (all ``[B]``).

    Attributes:
      loss: per-pair losses.
      chosen_rewards: implicit rewards of the chosen responses (no gradient).
      rejected_rewards: implicit rewards of the rejected responses.
    """
    loss: jax.Array
    chosen_rewards: jax.Array
    rejected_rewards: jax.Array


def _margin_loss(logits, *, loss_type, beta, label_smoothing, raw_margin):
    """Loss of the scaled margin ``logits = beta * raw_margin``."""
    if loss_type == "sigmoid":
        return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits)
                - label_smoothing * jax.nn.log_sigmoid(-logits))
    if loss_type == "ipo":
        return jnp.square(raw_margin - 1.0 / (2.0 * beta))
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - logits)
    return ((-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits)
             + label_smoothing * jax.nn.log_sigmoid(-logits))
            / (1.0 - 2.0 * label_smoothing))


def _pair_arrays(names_and_arrays):
    arrays = [jnp.asarray(a) for _, a in names_and_arrays]
    first_name, first = names_and_arrays[0][0], arrays[0]
    for (name, _), a in zip(names_and_arrays[1:], arrays[1:]):
        checks.check_same_shape(a, name, first, first_name)
    return arrays


def dpo_loss(
    chosen_log_probs: jax.Array,
    rejected_log_probs: jax.Array,
    ref_chosen_log_probs: jax.Array,
    ref_rejected_log_probs: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
    loss_type: PreferenceLossType = "sigmoid",
    label_smoothing: float | jax.Array = 0.0,
) -> PreferenceLoss:
    """DPO-family loss per preference pair (module docstring for formulas).

    Args:
      chosen_log_probs: ``[B]`` policy log-prob sums of the chosen responses.
      rejected_log_probs: ``[B]`` same for the rejected responses.
      ref_chosen_log_probs: ``[B]`` reference log-prob sums, chosen.
      ref_rejected_log_probs: ``[B]`` reference log-prob sums, rejected.
      beta: inverse temperature of the implicit reward, ``> 0``.
      loss_type: ``"sigmoid"``, ``"ipo"``, ``"hinge"`` or ``"robust"``.
      label_smoothing: assumed probability that a label is flipped
        (``sigmoid``: in ``[0, 1]``; ``robust``: in ``[0, 0.5)``).

    Returns:
      A :class:`PreferenceLoss` of ``[B]`` arrays.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> z = jnp.zeros(2)
      >>> afn.dpo_loss(z, z, z, z).loss   # equal log-ratios: log 2
      Array([0.6931472, 0.6931472], dtype=float32)
    """
    checks.check_choice(loss_type, PREFERENCE_LOSS_TYPES, "loss_type")
    ok = checks.all_ok(
        checks.check_hparam(beta, "beta", lo=0.0, lo_open=True),
        checks.check_hparam(label_smoothing, "label_smoothing", lo=0.0,
                            hi=0.5 if loss_type == "robust" else 1.0,
                            hi_open=loss_type == "robust"))
    pc, pr, rc, rr = _pair_arrays([
        ("chosen_log_probs", chosen_log_probs),
        ("rejected_log_probs", rejected_log_probs),
        ("ref_chosen_log_probs", ref_chosen_log_probs),
        ("ref_rejected_log_probs", ref_rejected_log_probs)])
    out_dtype, dt = checks.float_dtypes(pc, pr, rc, rr)
    rc = lax.stop_gradient(rc)
    rr = lax.stop_gradient(rr)
    rho_w = pc.astype(dt) - rc.astype(dt)
    rho_l = pr.astype(dt) - rr.astype(dt)
    raw = rho_w - rho_l
    loss = _margin_loss(beta * raw, loss_type=loss_type, beta=beta,
                        label_smoothing=label_smoothing, raw_margin=raw)
    return checks.nan_unless(ok, PreferenceLoss(
        loss.astype(out_dtype),
        lax.stop_gradient(beta * rho_w).astype(out_dtype),
        lax.stop_gradient(beta * rho_l).astype(out_dtype)))


def simpo_loss(
    chosen_log_probs: jax.Array,
    rejected_log_probs: jax.Array,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    *,
    beta: float | jax.Array = 2.0,
    margin: float | jax.Array = 1.0,
    loss_type: Literal["sigmoid", "hinge"] = "sigmoid",
    label_smoothing: float | jax.Array = 0.0,
) -> PreferenceLoss:
    """SimPO loss per preference pair (Meng et al. 2024): no reference model.

    The implicit reward of a response is its average token log-probability
    scaled by ``beta``; the loss asks the chosen reward to exceed the
    rejected one by the target ``margin``. Lengths below one are
    treated as one.

    Args:
      chosen_log_probs: ``[B]`` policy log-prob sums of the chosen responses.
      rejected_log_probs: ``[B]`` same for the rejected responses.
      chosen_lengths: ``[B]`` token counts of the chosen responses.
      rejected_lengths: ``[B]`` token counts of the rejected responses.
      beta: reward scale, ``> 0`` (the paper uses 2.0 to 2.5).
      margin: target reward margin, finite (the paper uses about
        ``0.5 * beta``).
      loss_type: ``"sigmoid"`` or ``"hinge"``.
      label_smoothing: label smoothing of the sigmoid loss, in ``[0, 1]``.

    Returns:
      A :class:`PreferenceLoss` of ``[B]`` arrays.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> out = afn.simpo_loss(jnp.array([-2.0]), jnp.array([-6.0]),
      ...                      jnp.array([2.0]), jnp.array([3.0]),
      ...                      beta=1.0, margin=0.0)
      >>> out.chosen_rewards, out.rejected_rewards
      (Array([-1.], dtype=float32), Array([-2.], dtype=float32))
    """
    checks.check_choice(loss_type, ("sigmoid", "hinge"), "loss_type")
    ok = checks.all_ok(
        checks.check_hparam(beta, "beta", lo=0.0, lo_open=True),
        checks.check_hparam(margin, "margin"),
        checks.check_hparam(label_smoothing, "label_smoothing", lo=0.0,
                            hi=1.0))
    pc, pr = _pair_arrays([("chosen_log_probs", chosen_log_probs),
                           ("rejected_log_probs", rejected_log_probs)])
    lc, lr = _pair_arrays([("chosen_lengths", chosen_lengths),
                           ("rejected_lengths", rejected_lengths)])
    checks.check_same_shape(lc, "chosen_lengths", pc, "chosen_log_probs")
    out_dtype, dt = checks.float_dtypes(pc, pr)
    lc = jnp.maximum(lc.astype(dt), 1.0)
    lr = jnp.maximum(lr.astype(dt), 1.0)
    r_w = beta * pc.astype(dt) / lc
    r_l = beta * pr.astype(dt) / lr
    logits = r_w - r_l - margin
    loss = _margin_loss(logits, loss_type=loss_type, beta=beta,
                        label_smoothing=label_smoothing, raw_margin=logits)
    return checks.nan_unless(ok, PreferenceLoss(
        loss.astype(out_dtype), lax.stop_gradient(r_w).astype(out_dtype),
        lax.stop_gradient(r_l).astype(out_dtype)))


def bradley_terry_loss(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    *,
    margin: jax.Array | float | None = None,
    center_coeff: float | jax.Array = 0.0,
) -> jax.Array:
    r"""Reward-model loss per preference pair (Bradley-Terry).

    With scalar rewards :math:`r_w` (chosen) and :math:`r_l` (rejected) from
    a reward model, the probability that the chosen response is preferred
    is :math:`\sigma(r_w - r_l)` (Bradley & Terry 1952; Ouyang et al. 2022,
    eq. 1). The loss is its negative log-likelihood, with an optional
    per-pair margin :math:`m` (Llama 2, Touvron et al. 2023, eq. 2: a
    clearer preference asks for a larger gap) and an optional centering
    term that keeps the rewards near zero (Eisenstein et al. 2023):

    .. math::
        \ell = -\log\sigma(r_w - r_l - m) + c\,(r_w + r_l)^2

    (its mean over pairs has the issue's form
    :math:`c\,\mathrm{mean}((r_w + r_l)^2)`).

    Args:
      chosen_rewards: ``[B]`` rewards of the chosen responses.
      rejected_rewards: ``[B]`` rewards of the rejected responses.
      margin: optional ``[B]`` (or scalar) margins, finite.
      center_coeff: the centering coefficient ``c >= 0``.

    Returns:
      ``[B]`` per-pair losses (float32 or wider).

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> afn.bradley_terry_loss(jnp.array([1.0, 0.0]), jnp.array([0.0, 0.0]))
      Array([0.3132617, 0.6931472], dtype=float32)
    """
    ok = checks.check_hparam(center_coeff, "center_coeff", lo=0.0)
    rw, rl = _pair_arrays([("chosen_rewards", chosen_rewards),
                           ("rejected_rewards", rejected_rewards)])
    out_dtype, dt = checks.float_dtypes(rw, rl)
    rw, rl = rw.astype(dt), rl.astype(dt)
    gap = rw - rl
    if margin is not None:
        margin = jnp.asarray(margin)
        checks.check_broadcastable(margin, rw.shape, "margin")
        gap = gap - margin.astype(dt)
    loss = -jax.nn.log_sigmoid(gap) + center_coeff * jnp.square(rw + rl)
    return checks.nan_unless(ok, loss.astype(out_dtype))
