"""Testing helpers: hypothesis strategies and NumPy reference loops.

Use them to property-test your own losses and rollouts the way the library
tests its own (needs ``hypothesis``: ``pip install artifex-fn[testing]``)::

    from hypothesis import given
    import numpy as np
    import artifex_fn as afn
    from artifex_fn import testing as aft

    @given(aft.trajectories())
    def test_my_gae(traj):
        ours = afn.gae_advantages(
            traj["rewards"], traj["values"], gamma=traj["gamma"],
            lambda_=traj["lambda_"], terminated=traj["terminated"],
            truncated=traj["truncated"], mask=traj["mask"])
        ref = aft.np_gae_advantages(
            traj["rewards"], traj["values"], traj["gamma"], traj["lambda_"],
            terminated=traj["terminated"], truncated=traj["truncated"],
            mask=traj["mask"])
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)
"""

from artifex_fn.testing._reference import np_aggregate_loss
from artifex_fn.testing._reference import np_clipped_surrogate_loss
from artifex_fn.testing._reference import np_discounted_returns
from artifex_fn.testing._reference import np_dpo_loss
from artifex_fn.testing._reference import np_gae_advantages
from artifex_fn.testing._reference import np_group_advantages
from artifex_fn.testing._reference import np_kl_estimate
from artifex_fn.testing._reference import np_lambda_returns
from artifex_fn.testing._reference import np_normalize_advantages
from artifex_fn.testing._reference import np_simpo_loss
from artifex_fn.testing._strategies import grouped_rewards
from artifex_fn.testing._strategies import preference_pairs
from artifex_fn.testing._strategies import trajectories

__all__ = (
    "grouped_rewards",
    "np_aggregate_loss",
    "np_clipped_surrogate_loss",
    "np_discounted_returns",
    "np_dpo_loss",
    "np_gae_advantages",
    "np_group_advantages",
    "np_kl_estimate",
    "np_lambda_returns",
    "np_normalize_advantages",
    "np_simpo_loss",
    "preference_pairs",
    "trajectories",
)
