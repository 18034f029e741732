"""Hypothesis strategies for RL data: trajectories, grouped rewards and
preference pairs."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

_FLOATS = dict(min_value=-10.0, max_value=10.0, allow_nan=False,
               allow_infinity=False, width=32)


@st.composite
def trajectories(draw, *, max_batch: int = 4, max_length: int = 16,
                 with_flags: bool = True, with_mask: bool = True):
    """Batches of trajectories, time on the last axis.

    Draws a dict with ``rewards [B, T]``, ``values [B, T + 1]`` (``V(s_0..
    s_T)``), ``terminated`` and ``truncated`` ``[B, T]`` booleans (all False
    when ``with_flags`` is False), ``mask [B, T]`` (right padding, each row
    at least one valid step; all ones when ``with_mask`` is False), a
    discount ``gamma`` and a ``lambda_``, both in ``[0, 1]``.
    """
    batch = draw(st.integers(1, max_batch))
    length = draw(st.integers(1, max_length))
    rewards = draw(hnp.arrays(np.float32, (batch, length),
                              elements=st.floats(**_FLOATS)))
    values = draw(hnp.arrays(np.float32, (batch, length + 1),
                             elements=st.floats(**_FLOATS)))
    if with_flags:
        terminated = draw(hnp.arrays(np.bool_, (batch, length)))
        truncated = draw(hnp.arrays(np.bool_, (batch, length)))
    else:
        terminated = np.zeros((batch, length), bool)
        truncated = np.zeros((batch, length), bool)
    if with_mask:
        lengths = draw(st.lists(st.integers(1, length), min_size=batch,
                                max_size=batch))
        mask = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
    else:
        mask = np.ones((batch, length), bool)
    gamma = draw(st.floats(0.0, 1.0, width=32))
    lambda_ = draw(st.floats(0.0, 1.0, width=32))
    return dict(rewards=rewards, values=values, terminated=terminated,
                truncated=truncated, mask=mask, gamma=gamma, lambda_=lambda_)


@st.composite
def grouped_rewards(draw, *, max_groups: int = 6, max_group_size: int = 8,
                    min_group_size: int = 1):
    """``(rewards [num_groups * group_size], group_size)``.

    Rewards are drawn from a small set of values half of the time, so that
    ties and zero-variance groups are common.
    """
    groups = draw(st.integers(1, max_groups))
    size = draw(st.integers(min_group_size, max_group_size))
    if draw(st.booleans()):
        elements = st.sampled_from([0.0, 1.0])
    else:
        elements = st.floats(**_FLOATS)
    rewards = draw(hnp.arrays(np.float32, (groups * size,),
                              elements=elements))
    return rewards, size


@st.composite
def preference_pairs(draw, *, max_batch: int = 8):
    """Dict of ``[B]`` policy and reference log-prob sums for chosen and
    rejected responses, plus their lengths (``1..64``)."""
    batch = draw(st.integers(1, max_batch))
    logp = st.floats(min_value=-50.0, max_value=0.0, allow_nan=False,
                     width=32)
    arrays = {name: draw(hnp.arrays(np.float32, (batch,), elements=logp))
              for name in ("chosen_log_probs", "rejected_log_probs",
                           "ref_chosen_log_probs", "ref_rejected_log_probs")}
    for name in ("chosen_lengths", "rejected_lengths"):
        arrays[name] = draw(hnp.arrays(np.int32, (batch,),
                                       elements=st.integers(1, 64)))
    return arrays
