"""PPO and REINFORCE on gymnax CartPole-v1, each run one compiled program.

PPO follows the usual fully-jitted recipe (Schulman et al. 2017; the
"PureJaxRL" layout of Lu et al. 2022): ``num_envs`` auto-resetting
environments step ``num_steps`` times under ``lax.scan``, then the library's
:func:`artifex_fn.ppo.update` runs GAE and ``num_epochs`` x
``num_minibatches`` clipped-surrogate steps. Termination and truncation are
kept apart: at the 500-step time limit the value of the *final* observation
(``info["final_observation"]``, before the reset) is bootstrapped, at a
termination nothing is. The value loss is clipped around the stored values
with the policy's clip range (``value_clip``, as in the PPO2 baselines):
with it all 8 seeds of the standard configuration end at a return of 500;
without it 3 of 8 seeds slid back to 250-300 after reaching 500 (same
seeds, 500k steps).

REINFORCE (Williams 1992) collects ``num_envs`` whole episodes per update
(up to the 500-step limit, padding masked) and calls
:func:`artifex_fn.reinforce.update` with a per-time-step mean baseline.

Hyper-parameters in :data:`HPARAMS` are traced (sweepable with ``vmap``);
:data:`SETTINGS` change shapes or loop lengths and are static. With
``anneal_lr`` the learning rate falls linearly to 0 over the run, one value
per iteration (an optax schedule on top of the traced peak ``lr``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from artifex_fn import ppo
from artifex_fn import reinforce
from artifex_fn.experiments._program import Program
from artifex_fn.experiments._program import adam
from artifex_fn.experiments._program import resolve_settings
from artifex_fn.experiments._program import with_learning_rate
from artifex_fn.experiments.tasks import Range

# The standard CartPole PPO configuration.
SETTINGS = dict(
    ppo=dict(num_envs=4, num_steps=128, total_timesteps=500_000,
             num_epochs=4, num_minibatches=4, hidden=64, anneal_lr=True,
             value_clip=True, eval_envs=32),
    reinforce=dict(num_envs=16, max_steps=500, total_episodes=4_000,
                   hidden=64, anneal_lr=False, eval_envs=32))
HPARAMS = dict(
    ppo=dict(lr=2.5e-4, gamma=0.99, gae_lambda=0.95, clip_param=0.2,
             vf_coeff=0.5, entropy_coeff=0.01, max_grad_norm=0.5),
    reinforce=dict(lr=1e-2, gamma=0.99, entropy_coeff=0.0,
                   max_grad_norm=1.0))

# The valid values of each setting and hyper-parameter, checked before
# anything is traced (the traced values never reach the configs' checks).
_COUNT, _FLAG = Range.count(), Range.flag()
_SHARED_RANGES = dict(
    num_envs=_COUNT, hidden=_COUNT, anneal_lr=_FLAG, eval_envs=_COUNT,
    lr=Range.positive(), gamma=Range.unit(),
    entropy_coeff=Range.non_negative(), max_grad_norm=Range.positive())
RANGES = dict(
    ppo=dict(_SHARED_RANGES, num_steps=_COUNT, total_timesteps=_COUNT,
             num_epochs=_COUNT, num_minibatches=_COUNT, value_clip=_FLAG,
             gae_lambda=Range.unit(), clip_param=Range.non_negative(),
             vf_coeff=Range.non_negative()),
    reinforce=dict(_SHARED_RANGES, max_steps=_COUNT, total_episodes=_COUNT))


def check_settings(algo: str, settings: dict) -> None:
    """Constraints between settings that their ranges cannot express."""
    if algo == "ppo":
        batch = settings["num_envs"] * settings["num_steps"]
        if batch % settings["num_minibatches"]:
            raise ValueError(
                f"num_minibatches={settings['num_minibatches']} must divide "
                f"num_envs * num_steps = {batch}")


def iteration_budget(algo: str, settings: dict) -> tuple[int, str, str]:
    """``(amount, formula, unit)`` of the ``--steps`` budget one iteration
    uses: ``num_envs * num_steps`` environment steps for PPO, ``num_envs``
    episodes for REINFORCE."""
    if algo == "ppo":
        return (settings["num_envs"] * settings["num_steps"],
                "num_envs * num_steps", "environment steps")
    return settings["num_envs"], "num_envs", "episodes"


def orthogonal(scale: float = 1.0):
    """Orthogonal initializer (Saxe et al. 2014) built from matrix products.

    The same matrix as ``jax.nn.initializers.orthogonal(scale)`` for the
    same key (up to rounding): a Gaussian matrix is drawn as there and
    orthonormalised by classical Gram-Schmidt applied twice, which is its
    QR factor with a positive diagonal.

    Workaround for a deadlock in jaxlib 0.10.2 (CPU; pinned in
    constraints.txt): batched over seeds (``vmap``), XLA's CPU runtime runs
    two batched LAPACK QR calls concurrently, each waiting on the same
    two-thread pool for the other's work. Recheck before moving back to
    ``jax.nn.initializers.orthogonal`` on a newer jaxlib.
    """

    def init(key, shape, dtype=jnp.float32):
        if len(shape) != 2:
            raise ValueError(f"orthogonal init needs a 2-D shape, got {shape}.")
        n_rows, n_cols = shape
        z = jax.random.normal(key, (max(n_rows, n_cols), min(n_rows, n_cols)),
                              dtype)
        q = _gram_schmidt(z.astype(jnp.float32))
        if n_rows < n_cols:
            q = q.T
        return (scale * q).astype(dtype)

    return init


def _gram_schmidt(z):
    """Orthonormal columns spanning ``z``'s (CGS2, column by column)."""
    k = z.shape[1]

    def column(j, q):
        v = z[:, j]
        for _ in range(2):  # the second pass removes the first's rounding
            v = v - q @ (q.T @ v)
        return q.at[:, j].set(v / jnp.linalg.norm(v))

    return jax.lax.fori_loop(0, k, column, jnp.zeros_like(z))


def _env():
    try:
        import gymnax
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "the cartpole task needs gymnax: pip install 'artifex-fn[cli]' "
            "(or pip install gymnax)") from e
    env, env_params = gymnax.make("CartPole-v1")
    return env, env_params


def _rollout_randomness(env, env_params, key, num_steps: int,
                        num_envs: int, num_actions: int = 2):
    """Every random number a rollout of ``num_steps`` x ``num_envs`` needs.

    Drawn before the rollout's ``lax.scan`` in a few batched calls: JAX
    lowers each threefry call on CPU to a small loop, and a rollout of tiny
    per-step calls (a key split, the action sample, the reset inside
    gymnax's ``step``) spends about a third of a CartPole PPO iteration in
    them. Returns ``[T, E, ...]`` arrays: Gumbel noise for the actions
    (``argmax(logits + gumbel)`` samples the softmax policy, as
    ``jax.random.categorical`` does), the keys for ``env.step_env`` and a
    freshly reset ``(obs, state)`` per slot for the auto-reset.
    """
    k_act, k_step, k_reset = jax.random.split(key, 3)
    gumbel = jax.random.gumbel(k_act, (num_steps, num_envs, num_actions))
    step_keys = jax.random.split(k_step, num_steps * num_envs)
    reset_obs, reset_state = jax.vmap(env.reset_env, (0, None))(
        jax.random.split(k_reset, num_steps * num_envs), env_params)

    def grid(x):
        return jnp.reshape(x, (num_steps, num_envs) + x.shape[1:])

    return jax.tree_util.tree_map(
        grid, (gumbel.reshape(-1, num_actions), step_keys, reset_obs,
               reset_state))


def _auto_reset_step(env, env_params):
    """gymnax's ``env.step`` with the reset drawn in advance.

    ``(key, state, action, reset_obs, reset_state) -> (obs, state, reward,
    terminated, truncated, final_obs)`` for one environment: step, check the
    time limit, and where the episode ended continue from the given reset
    (``final_obs`` is the observation before it).
    """

    def step(key, state, action, reset_obs, reset_state):
        obs, state, reward, terminated, _ = env.step_env(
            key, state, action, env_params)
        truncated = env.is_truncated(state, env_params)
        done = jnp.logical_or(terminated, truncated)
        next_state = jax.tree_util.tree_map(
            lambda r, s: jax.lax.select(done, r, s), reset_state, state)
        next_obs = jax.lax.select(done, reset_obs, obs)
        return next_obs, next_state, reward, terminated, truncated, obs

    return jax.vmap(step)


class ActorCritic(nnx.Module):
    """Separate tanh MLPs for the policy logits and the value.

    Orthogonal initialisation with gains sqrt(2) (hidden), 0.01 (logits) and
    1 (value), as in the PPO implementation details of Huang et al. 2022.
    """

    def __init__(self, obs_dim: int, num_actions: int, hidden: int = 64, *,
                 rngs: nnx.Rngs):
        def dense(i, o, gain):
            return nnx.Linear(
                i, o, kernel_init=orthogonal(gain),
                bias_init=nnx.initializers.zeros_init(), rngs=rngs)

        g = math.sqrt(2.0)
        self.actor = nnx.List([dense(obs_dim, hidden, g), dense(hidden, hidden, g),
                               dense(hidden, num_actions, 0.01)])
        self.critic = nnx.List([dense(obs_dim, hidden, g), dense(hidden, hidden, g),
                                dense(hidden, 1, 1.0)])

    def __call__(self, obs):
        a = jnp.tanh(self.actor[0](obs))
        a = jnp.tanh(self.actor[1](a))
        v = jnp.tanh(self.critic[0](obs))
        v = jnp.tanh(self.critic[1](v))
        return self.actor[2](a), self.critic[2](v)[..., 0]


def _model_fns(hidden: int, obs_dim: int = 4, num_actions: int = 2):
    """``(init_params(key), apply(params, obs) -> (logits, value),
    policy(params, obs) -> logits)``."""
    graphdef, _ = nnx.split(ActorCritic(obs_dim, num_actions, hidden,
                                        rngs=nnx.Rngs(0)))

    def init_params(key):
        return nnx.state(ActorCritic(obs_dim, num_actions, hidden,
                                     rngs=nnx.Rngs(key)))

    def apply(params, obs):
        return nnx.merge(graphdef, params)(obs)

    return init_params, apply, lambda params, obs: apply(params, obs)[0]


def _optimizer(s, num_updates: int, steps_per_update: int):
    """Adam at the traced ``lr``; with ``anneal_lr`` scaled by an optax
    linear schedule from 1 to 0, one value per iteration (its
    ``steps_per_update`` optimiser steps)."""
    if not s["anneal_lr"]:
        return adam(eps=1e-5)
    linear = optax.linear_schedule(1.0, 0.0, num_updates)
    return adam(eps=1e-5, schedule=lambda count: linear(
        count // steps_per_update))


def _episodes(env, env_params, policy, num_envs: int, max_steps: int):
    """``(params, key) -> trajectory`` of ``num_envs`` fresh episodes.

    Runs ``max_steps`` steps without resets; the trajectory holds ``[E, T]``
    arrays ``obs``, ``action`` (sampled from ``policy(params, obs)``
    logits with Gumbel noise drawn before the scan), ``reward`` (0 after
    the episode's end), ``terminated`` and ``mask`` (1 while it runs).
    """
    def episodes(params, key):
        k_reset, k_act, k_step = jax.random.split(key, 3)
        obs, env_state = jax.vmap(env.reset, (0, None))(
            jax.random.split(k_reset, num_envs), env_params)

        def env_step(c, noise):
            obs, env_state, alive = c
            gumbel, step_keys = noise
            action = jnp.argmax(policy(params, obs) + gumbel, axis=-1)
            next_obs, env_state, reward, terminated, _ = jax.vmap(
                env.step_env, (0, 0, 0, None))(
                    step_keys, env_state, action, env_params)
            transition = dict(obs=obs, action=action, reward=reward * alive,
                              terminated=terminated, mask=alive)
            alive = alive * (1.0 - terminated.astype(jnp.float32))
            return (next_obs, env_state, alive), transition

        noise = (jax.random.gumbel(k_act, (max_steps, num_envs, 2)),
                 jax.random.split(k_step, max_steps * num_envs).reshape(
                     max_steps, num_envs, -1))
        _, traj = jax.lax.scan(env_step, (obs, env_state, jnp.ones(num_envs)),
                               noise)
        return jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), traj)

    return episodes


def _evaluate(env, env_params, policy, num_envs: int):
    """``evaluate(carry, key, hparams)``: the mean undiscounted return of
    ``num_envs`` fresh episodes (sampled actions)."""
    episodes = _episodes(env, env_params, policy, num_envs,
                         int(env_params.max_steps_in_episode))

    def evaluate(carry, key, hp):
        del hp
        total = jnp.sum(episodes(carry["train"].params, key)["reward"], 1)
        return dict(eval_return=jnp.mean(total),
                    eval_return_min=jnp.min(total))

    return evaluate


def ppo_program(settings: dict | None = None) -> Program:
    """PPO on CartPole-v1 (see the module docstring)."""
    s = resolve_settings("cartpole/ppo", SETTINGS["ppo"], RANGES["ppo"],
                         settings)
    check_settings("ppo", s)
    env, env_params = _env()
    num_envs, num_steps = s["num_envs"], s["num_steps"]
    batch = num_envs * num_steps
    num_updates = max(1, s["total_timesteps"] // batch)
    init_params, apply, policy = _model_fns(s["hidden"])
    optimizer = _optimizer(s, num_updates,
                           s["num_epochs"] * s["num_minibatches"])
    evaluate = _evaluate(env, env_params, policy, s["eval_envs"])
    env_step_fn = _auto_reset_step(env, env_params)

    def config(hp):
        return ppo.PPOConfig(
            gamma=hp["gamma"], gae_lambda=hp["gae_lambda"],
            clip_param=hp["clip_param"], vf_coeff=hp["vf_coeff"],
            entropy_coeff=hp["entropy_coeff"],
            max_grad_norm=hp["max_grad_norm"], num_epochs=s["num_epochs"],
            num_minibatches=s["num_minibatches"], policy=apply,
            value_clip_param=hp["clip_param"] if s["value_clip"] else None,
            optimizer=optimizer)

    def init(key, hp):
        k_params, k_env, k_state, k_run = jax.random.split(key, 4)
        params = init_params(k_params)
        state = with_learning_rate(ppo.init(params, config(hp), key=k_state),
                                   hp["lr"])
        obs, env_state = jax.vmap(env.reset, (0, None))(
            jax.random.split(k_env, num_envs), env_params)
        return dict(train=state, obs=obs, env_state=env_state, key=k_run,
                    ep_return=jnp.zeros(num_envs), last_return=jnp.zeros(()))

    def step(carry, hp):
        train = carry["train"]
        params = train.params
        key, rollout_key = jax.random.split(carry["key"])

        def env_step(c, noise):
            obs, env_state, ep_return, done_sum, done_count = c
            gumbel, step_keys, reset_obs, reset_state = noise
            logits, value = apply(params, obs)
            action = jnp.argmax(logits + gumbel, axis=-1)
            log_prob = jnp.take_along_axis(
                jax.nn.log_softmax(logits), action[:, None], -1)[:, 0]
            next_obs, env_state, reward, terminated, truncated, final_obs = (
                env_step_fn(step_keys, env_state, action, reset_obs,
                            reset_state))
            done = jnp.logical_or(terminated, truncated)
            ep_return = ep_return + reward
            done_sum = done_sum + jnp.sum(jnp.where(done, ep_return, 0.0))
            done_count = done_count + jnp.sum(done)
            ep_return = jnp.where(done, 0.0, ep_return)
            transition = dict(obs=obs, action=action, log_prob=log_prob,
                              value=value, reward=reward,
                              terminated=terminated, truncated=truncated,
                              final_obs=final_obs)
            return (next_obs, env_state, ep_return, done_sum, done_count), transition

        c0 = (carry["obs"], carry["env_state"], carry["ep_return"],
              jnp.zeros(()), jnp.zeros((), jnp.int32))
        (obs, env_state, ep_return, done_sum, done_count), traj = jax.lax.scan(
            env_step, c0, _rollout_randomness(env, env_params, rollout_key,
                                              num_steps, num_envs))
        # [T, E] -> [E, T]; the value after every step is V(final_obs): the
        # next observation of the same episode (before any reset).
        traj = jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), traj)
        _, next_values = apply(params, traj["final_obs"])
        # After the last step of the rollout the episode continues: truncate
        # the GAE recursion there and bootstrap V(final_obs).
        truncated = traj["truncated"].at[:, -1].set(True)
        batch_ = dict(observations=traj["obs"], actions=traj["action"],
                      log_probs=traj["log_prob"], values=traj["value"],
                      rewards=traj["reward"], dones=traj["terminated"],
                      truncated=truncated, next_values=next_values)
        train, metrics = ppo.update(train, batch_)
        last_return = jnp.where(done_count > 0,
                                done_sum / jnp.maximum(done_count, 1),
                                carry["last_return"])
        metrics = dict(metrics, episode_return=last_return,
                       episodes=done_count.astype(jnp.float32))
        carry = dict(train=train, obs=obs, env_state=env_state, key=key,
                     ep_return=ep_return, last_return=last_return)
        return carry, metrics

    return Program(init=init, step=step, evaluate=evaluate,
                   num_iterations=num_updates, samples_per_iteration=batch,
                   curve="episode_return", score="eval_return",
                   description="PPO on CartPole-v1 (gymnax)")


def reinforce_program(settings: dict | None = None) -> Program:
    """REINFORCE on CartPole-v1 with whole episodes (see the module docstring)."""
    s = resolve_settings("cartpole/reinforce", SETTINGS["reinforce"],
                         RANGES["reinforce"], settings)
    env, env_params = _env()
    num_envs, max_steps = s["num_envs"], s["max_steps"]
    num_updates = max(1, s["total_episodes"] // num_envs)
    init_params, _, policy = _model_fns(s["hidden"])
    optimizer = _optimizer(s, num_updates, 1)
    evaluate = _evaluate(env, env_params, policy, s["eval_envs"])
    episodes = _episodes(env, env_params, policy, num_envs, max_steps)

    def config(hp):
        return reinforce.REINFORCEConfig(
            gamma=hp["gamma"], entropy_coeff=hp["entropy_coeff"],
            max_grad_norm=hp["max_grad_norm"], baseline="mean",
            normalize_returns=True, policy=policy, optimizer=optimizer)

    def init(key, hp):
        k_params, k_state, k_run = jax.random.split(key, 3)
        state = reinforce.init(init_params(k_params), config(hp), key=k_state)
        return dict(train=with_learning_rate(state, hp["lr"]), key=k_run)

    def step(carry, hp):
        key, k_episodes = jax.random.split(carry["key"])
        traj = episodes(carry["train"].params, k_episodes)
        batch_ = dict(observations=traj["obs"], actions=traj["action"],
                      rewards=traj["reward"], dones=traj["terminated"],
                      mask=traj["mask"])
        train, metrics = reinforce.update(carry["train"], batch_)
        episode_return = jnp.mean(jnp.sum(traj["reward"], axis=1))
        metrics = dict(metrics, episode_return=episode_return,
                       episodes=jnp.asarray(num_envs, jnp.float32))
        return dict(train=train, key=key), metrics

    return Program(init=init, step=step, evaluate=evaluate,
                   num_iterations=num_updates,
                   samples_per_iteration=num_envs * max_steps,
                   curve="episode_return", score="eval_return",
                   description="REINFORCE on CartPole-v1 (gymnax)")
