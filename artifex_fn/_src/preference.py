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

Two more take other inputs: :func:`kto_loss` (KTO, Ethayarajh et al. 2024)
scores *unpaired* responses, each labelled desirable or undesirable,
against a KL reference point; :func:`orpo_loss` (ORPO, Hong et al. 2024)
is reference-free and compares the odds of the chosen and rejected
responses' length-normalised likelihoods.
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


class KTOLoss(NamedTuple):
    """Per-example KTO loss and implicit rewards (both ``[B]``).

    Attributes:
      loss: per-example losses.
      rewards: implicit rewards ``beta * (log pi - log pi_ref)`` (no
        gradient).
    """
    loss: jax.Array
    rewards: jax.Array


def kto_loss(
    policy_log_probs: jax.Array,
    ref_log_probs: jax.Array,
    desirable: jax.Array,
    kl_ref: jax.Array | float,
    *,
    beta: float | jax.Array = 0.1,
    desirable_weight: float | jax.Array = 1.0,
    undesirable_weight: float | jax.Array = 1.0,
) -> KTOLoss:
    r"""Kahneman-Tversky Optimization loss per example (Ethayarajh et al.
    2024, section 4): unpaired responses, each desirable or undesirable.

    With the log-ratio :math:`\rho = \log\pi_\theta(y|x) -
    \log\pi_{ref}(y|x)` and the reference point
    :math:`z = \max(\mathrm{KL}_{ref}, 0)` (an estimate of
    :math:`\mathrm{KL}(\pi_\theta \| \pi_{ref})`, held constant:
    ``stop_gradient``):

    .. math::
        \ell = \begin{cases}
          \lambda_D\,(1 - \sigma(\beta(\rho - z))) & y \text{ desirable}\\
          \lambda_U\,(1 - \sigma(\beta(z - \rho))) & y \text{ undesirable}
        \end{cases}

    (the paper's :math:`\lambda_y - v(x, y)`). Both cases are computed as
    :math:`\sigma(\cdot)` of the negated argument and selected with
    ``where``, so neither branch can put NaN into the value or the
    gradient of the other.

    Args:
      policy_log_probs: ``[B]`` policy log-prob sums of the responses.
      ref_log_probs: ``[B]`` reference log-prob sums (no gradient).
      desirable: ``[B]`` booleans (nonzero: desirable).
      kl_ref: the KL estimate, a scalar or ``[B]``; clamped at 0, no
        gradient.
      beta: inverse temperature of the implicit reward, ``> 0``.
      desirable_weight: :math:`\lambda_D \ge 0`.
      undesirable_weight: :math:`\lambda_U \ge 0`.

    Returns:
      A :class:`KTOLoss` of ``[B]`` arrays.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> out = afn.kto_loss(jnp.array([-1.0, -1.0]), jnp.array([-1.0, -1.0]),
      ...                    jnp.array([True, False]), 0.0)
      >>> out.loss    # rho = z = 0: 1 - sigmoid(0) either way
      Array([0.5, 0.5], dtype=float32)
    """
    ok = checks.all_ok(
        checks.check_hparam(beta, "beta", lo=0.0, lo_open=True),
        checks.check_hparam(desirable_weight, "desirable_weight", lo=0.0),
        checks.check_hparam(undesirable_weight, "undesirable_weight",
                            lo=0.0))
    pl, rl = _pair_arrays([("policy_log_probs", policy_log_probs),
                           ("ref_log_probs", ref_log_probs)])
    checks.check_min_rank(pl, 1, "policy_log_probs")
    desirable = jnp.asarray(desirable)
    checks.check_same_shape(desirable, "desirable", pl, "policy_log_probs")
    kl_ref = jnp.asarray(kl_ref)
    checks.check_broadcastable(kl_ref, pl.shape, "kl_ref")
    out_dtype, dt = checks.float_dtypes(pl, rl)
    rho = pl.astype(dt) - lax.stop_gradient(rl).astype(dt)
    z = lax.stop_gradient(jnp.maximum(kl_ref.astype(dt), 0.0))
    # 1 - sigmoid(x) = sigmoid(-x), without the cancellation for large x.
    desirable_loss = desirable_weight * jax.nn.sigmoid(beta * (z - rho))
    undesirable_loss = undesirable_weight * jax.nn.sigmoid(beta * (rho - z))
    loss = jnp.where(desirable.astype(bool), desirable_loss, undesirable_loss)
    return checks.nan_unless(ok, KTOLoss(
        loss.astype(out_dtype),
        lax.stop_gradient(beta * rho).astype(out_dtype)))


class ORPOLoss(NamedTuple):
    """Per-pair ORPO odds-ratio term, log-odds and implicit rewards (``[B]``).

    Attributes:
      loss: the odds-ratio term
        :math:`-\\lambda\\log\\sigma(\\text{log-odds})` per pair (without
        the SFT term).
      log_odds: :math:`\\log\\frac{odds(y_w|x)}{odds(y_l|x)}`.
      chosen_rewards: :math:`\\lambda` times the chosen responses' mean token
        log-probs (no gradient).
      rejected_rewards: the same for the rejected responses.
    """
    loss: jax.Array
    log_odds: jax.Array
    chosen_rewards: jax.Array
    rejected_rewards: jax.Array


# Mean token log-probs are clamped to at most this value before the log-odds:
# log(1 - p) = log(-expm1(a)) is -inf at a = 0 (p = 1, e.g. an empty
# response), and its gradient grows like 1/|a|; at -1e-6 both stay finite.
ORPO_MAX_MEAN_LOG_PROB = -1e-6


def _log_odds(mean_log_prob):
    """``log(p / (1 - p))`` for ``p = exp(a)``, stable for ``a <= 0``."""
    a = jnp.minimum(mean_log_prob, ORPO_MAX_MEAN_LOG_PROB)
    return a - jnp.log(-jnp.expm1(a))


def orpo_loss(
    chosen_log_probs: jax.Array,
    rejected_log_probs: jax.Array,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    *,
    lambda_: float | jax.Array = 0.1,
) -> ORPOLoss:
    r"""Odds-ratio term of ORPO per preference pair (Hong et al. 2024,
    section 4): no reference model.

    With the mean token log-probs :math:`a = \frac{1}{|y|}\log\pi_\theta(y|x)`
    (lengths below one treated as one) and
    :math:`\mathrm{odds}(y|x) = \frac{e^{a}}{1 - e^{a}}`:

    .. math::
        \text{log-odds} = (a_w - a_l)
          - \left(\log(1 - e^{a_w}) - \log(1 - e^{a_l})\right),\qquad
        \ell_{OR} = -\lambda\log\sigma(\text{log-odds})

    :math:`\log(1 - e^{a})` is computed as ``log(-expm1(a))`` with ``a``
    clamped to at most ``-1e-6``, so that a
    response of probability one (or an empty response, ``a = 0``) gives a
    finite value and gradient. The full ORPO loss adds the SFT term, the
    negative log-likelihood of the chosen responses as a token mean
    (:mod:`artifex_fn.orpo`). The implicit rewards follow TRL's
    ``ORPOTrainer``: :math:`\lambda a_w` and :math:`\lambda a_l`.

    Args:
      chosen_log_probs: ``[B]`` policy log-prob sums of the chosen responses.
      rejected_log_probs: ``[B]`` same for the rejected responses.
      chosen_lengths: ``[B]`` token counts of the chosen responses.
      rejected_lengths: ``[B]`` token counts of the rejected responses.
      lambda_: weight of the odds-ratio term, ``>= 0`` (the paper uses 0.1
        to 0.25).

    Returns:
      An :class:`ORPOLoss` of ``[B]`` arrays.

    Examples:
      >>> import jax.numpy as jnp
      >>> import artifex_fn as afn
      >>> half = jnp.log(jnp.array([0.5]))   # p = 1/2: odds 1
      >>> out = afn.orpo_loss(2 * half, 2 * half, jnp.array([2.0]),
      ...                     jnp.array([2.0]), lambda_=1.0)
      >>> out.log_odds, out.loss            # equal odds: log 2
      (Array([0.], dtype=float32), Array([0.6931472], dtype=float32))
    """
    ok = checks.check_hparam(lambda_, "lambda_", lo=0.0)
    pc, pr = _pair_arrays([("chosen_log_probs", chosen_log_probs),
                           ("rejected_log_probs", rejected_log_probs)])
    checks.check_min_rank(pc, 1, "chosen_log_probs")
    lc, lr = _pair_arrays([("chosen_lengths", chosen_lengths),
                           ("rejected_lengths", rejected_lengths)])
    checks.check_same_shape(lc, "chosen_lengths", pc, "chosen_log_probs")
    out_dtype, dt = checks.float_dtypes(pc, pr)
    a_w = pc.astype(dt) / jnp.maximum(lc.astype(dt), 1.0)
    a_l = pr.astype(dt) / jnp.maximum(lr.astype(dt), 1.0)
    log_odds = _log_odds(a_w) - _log_odds(a_l)
    loss = -lambda_ * jax.nn.log_sigmoid(log_odds)
    cast = lambda x: x.astype(out_dtype)
    return checks.nan_unless(ok, ORPOLoss(
        cast(loss), cast(log_odds),
        cast(lax.stop_gradient(lambda_ * a_w)),
        cast(lax.stop_gradient(lambda_ * a_l))))
