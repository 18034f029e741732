"""A hand-written fully-jitted PPO on gymnax CartPole-v1, without the library.

The speed baseline of ``bench_cartpole.py``: the same network, environment,
rollout and update schedule as :mod:`artifex_fn.experiments.cartpole`, in
plain JAX + optax (GAE by a reverse ``lax.scan``, the clipped surrogate, the
value loss and the entropy bonus written out by hand, no metrics beyond the
loss, the value loss clipped as in PPO2). Truncation is handled the same way
(bootstrap ``V(final_obs)``), so both programs do the same arithmetic.
"""

from __future__ import annotations

import math

import gymnax
import jax
import jax.numpy as jnp
import optax

from artifex_fn.experiments.cartpole import orthogonal

CONFIG = dict(num_envs=4, num_steps=128, total_timesteps=500_000,
              num_epochs=4, num_minibatches=4, hidden=64, lr=2.5e-4,
              gamma=0.99, gae_lambda=0.95, clip=0.2, vf_coeff=0.5,
              ent_coeff=0.01, max_grad_norm=0.5)


def _dense(key, i, o, gain):
    # QR-free: batched LAPACK QR deadlocks jaxlib 0.10.2's CPU runtime
    # (the workaround in cartpole.orthogonal)
    w = orthogonal(gain)(key, (i, o))
    return dict(w=w, b=jnp.zeros(o))


def init_params(key, hidden, obs_dim=4, num_actions=2):
    k = jax.random.split(key, 6)
    g = math.sqrt(2.0)
    return dict(
        actor=[_dense(k[0], obs_dim, hidden, g), _dense(k[1], hidden, hidden, g),
               _dense(k[2], hidden, num_actions, 0.01)],
        critic=[_dense(k[3], obs_dim, hidden, g), _dense(k[4], hidden, hidden, g),
                _dense(k[5], hidden, 1, 1.0)])


def apply(params, obs):
    def mlp(layers, x):
        x = jnp.tanh(x @ layers[0]["w"] + layers[0]["b"])
        x = jnp.tanh(x @ layers[1]["w"] + layers[1]["b"])
        return x @ layers[2]["w"] + layers[2]["b"]
    return mlp(params["actor"], obs), mlp(params["critic"], obs)[..., 0]


def make_train(config=CONFIG):
    c = dict(config)
    env, env_params = gymnax.make("CartPole-v1")
    E, T = c["num_envs"], c["num_steps"]
    n = E * T
    num_updates = c["total_timesteps"] // n
    mb = n // c["num_minibatches"]

    def schedule(count):
        frac = 1.0 - (count // (c["num_minibatches"] * c["num_epochs"])) / num_updates
        return c["lr"] * frac

    tx = optax.chain(optax.clip_by_global_norm(c["max_grad_norm"]),
                     optax.adam(schedule, eps=1e-5))

    def loss_fn(params, b):
        logits, value = apply(params, b["obs"])
        logp_all = jax.nn.log_softmax(logits)
        logp = jnp.take_along_axis(logp_all, b["action"][:, None], -1)[:, 0]
        entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, -1).mean()
        v_clipped = b["value"] + jnp.clip(value - b["value"], -c["clip"],
                                          c["clip"])
        v_loss = 0.5 * jnp.mean(jnp.maximum((value - b["targets"]) ** 2,
                                            (v_clipped - b["targets"]) ** 2))
        adv = b["adv"]
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        ratio = jnp.exp(logp - b["log_prob"])
        pg = -jnp.minimum(ratio * adv,
                          jnp.clip(ratio, 1 - c["clip"], 1 + c["clip"]) * adv)
        return pg.mean() + c["vf_coeff"] * v_loss - c["ent_coeff"] * entropy

    def init(key):
        k_params, k_env, key = jax.random.split(key, 3)
        params = init_params(k_params, c["hidden"])
        opt_state = tx.init(params)
        obs, env_state = jax.vmap(env.reset, (0, None))(
            jax.random.split(k_env, E), env_params)
        return (params, opt_state, obs, env_state, jnp.zeros(E), key)

    def update(carry, _):
        params, opt_state, obs, env_state, ep_ret, key = carry
        key, k_roll, k_perm = jax.random.split(key, 3)

        def env_step(cc, k):
            obs, env_state, ep_ret = cc
            k1, k2 = jax.random.split(k)
            logits, value = apply(params, obs)
            action = jax.random.categorical(k1, logits)
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits),
                                       action[:, None], -1)[:, 0]
            nobs, env_state, r, term, trunc, info = jax.vmap(
                env.step, (0, 0, 0, None))(jax.random.split(k2, E),
                                           env_state, action, env_params)
            done = term | trunc
            ep_ret = ep_ret + r
            finished = jnp.where(done, ep_ret, jnp.nan)
            ep_ret = jnp.where(done, 0.0, ep_ret)
            return (nobs, env_state, ep_ret), (
                obs, action, logp, value, r, term, trunc,
                info["final_observation"], finished)

        (obs, env_state, ep_ret), traj = jax.lax.scan(
            env_step, (obs, env_state, ep_ret), jax.random.split(k_roll, T))
        o, a, lp, v, r, term, trunc, fobs, finished = traj
        _, nv = apply(params, fobs)
        trunc = trunc.at[-1].set(True)

        def gae_step(next_adv, x):
            r, v, nv, term, trunc = x
            delta = r + c["gamma"] * nv * (1.0 - term) - v
            adv = delta + c["gamma"] * c["gae_lambda"] * (1.0 - term) * (
                1.0 - trunc) * next_adv
            return adv, adv

        _, adv = jax.lax.scan(
            gae_step, jnp.zeros(E),
            (r, v, nv, term.astype(jnp.float32), trunc.astype(jnp.float32)),
            reverse=True)
        flat = dict(obs=o.reshape(n, -1), action=a.reshape(n),
                    log_prob=lp.reshape(n), adv=adv.reshape(n),
                    value=v.reshape(n), targets=(adv + v).reshape(n))

        def epoch(cc, k):
            perm = jax.random.permutation(k, n)
            mbs = jax.tree_util.tree_map(
                lambda x: x[perm].reshape((c["num_minibatches"], mb) + x.shape[1:]),
                flat)

            def mb_step(cc, b):
                params, opt_state = cc
                grads = jax.grad(loss_fn)(params, b)
                updates, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), None

            return jax.lax.scan(mb_step, cc, mbs)[0], None

        (params, opt_state), _ = jax.lax.scan(
            epoch, (params, opt_state),
            jax.random.split(k_perm, c["num_epochs"]))
        ret = jnp.nanmean(finished)
        return (params, opt_state, obs, env_state, ep_ret, key), ret

    def train(key):
        carry, returns = jax.lax.scan(update, init(key), None,
                                      length=num_updates)
        return carry[0], returns

    return train, num_updates * n, init, update
