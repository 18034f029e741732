"""NNX trainers for REINFORCE, PPO, GRPO, online DPO, DPO and reward models.

Each trainer is a thin shell over an algorithm's pure ``update``: a step
reads the model's trainable variables and the optimiser state, runs
``jax.jit(update)`` (compiled once per batch structure and static
configuration), and writes the results back into the ``nnx.Module`` and
``nnx.Optimizer`` the user holds. The model becomes the algorithm's
``policy``: ``model(observations)`` returns logits or a ``distrax``
distribution (PPO: ``(logits_or_distribution, value)``); a model whose
``__call__`` does something else (a generator returning samples) defines
``policy_outputs(observations)`` or the trainer gets ``apply_fn=(model,
observations) -> outputs``. Variables outside
the optimiser's ``wrt`` filter (batch statistics, RNG counters) are passed
to the model read-only.

The config reaches the compiled steps as in every trainer (see
:mod:`artifex_fn.training.trainers.base`): numbers traced, functions
static, the ``policy`` and ``optimizer`` fields filled by the trainer.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

from artifex_fn import TrainState
from artifex_fn import truncated_completions
from artifex_fn import dpo as _dpo
from artifex_fn import grpo as _grpo
from artifex_fn import online_dpo as _online_dpo
from artifex_fn import ppo as _ppo
from artifex_fn import reinforce as _reinforce
from artifex_fn import reward_model as _reward_model
from artifex_fn import sampling
from artifex_fn.training.reward_functions import is_host_reward
from artifex_fn.training.reward_functions import reward_parts
from artifex_fn.training.trainers.base import Trainer
from artifex_fn.training.trainers.base import VariableBinding
from artifex_fn.training.trainers.base import key_data


def _apply(graphdef, state, apply_fn, params, observations):
    """``apply_fn(module, observations)`` on the module rebuilt from state."""
    model = nnx.merge(graphdef, params, state) if state is not None else (
        nnx.merge(graphdef, params))
    return apply_fn(model, observations)


def _call(model, observations):
    return model(observations)


def _apply_pair(graphdef, apply_fn, params_and_rest, observations):
    """``_apply`` with the parameters and the other variables as one pair
    (the reference state of a LoRA policy)."""
    params, rest = params_and_rest
    return _apply(graphdef, rest, apply_fn, params, observations)


def _zero_where(tree, flags):
    """``tree`` with the leaves flagged True (in flattening order)
    replaced by zeros."""
    if tree is None:
        return None
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return jax.tree_util.tree_unflatten(treedef, [
        jnp.zeros_like(x) if f else x for x, f in zip(leaves, flags)])


def _mix_into(policy, reference, mix):
    """``mix * policy + (1 - mix) * reference`` on floating leaves (other
    leaves are copied from the policy)."""
    def one(p, r):
        if jnp.issubdtype(jnp.asarray(p).dtype, jnp.floating):
            return optax.incremental_update(p, r, mix).astype(r.dtype)
        return p
    return jax.tree_util.tree_map(one, policy, reference)


def _call_policy_outputs(model, observations):
    return model.policy_outputs(observations)


def resolve_apply_fn(model, apply_fn=None):
    """How a trainer gets policy outputs from ``model``.

    ``apply_fn(model, observations)`` if given; else the model's
    ``policy_outputs(observations)`` method if its class defines one (for
    models whose ``__call__`` does something else, e.g. a generator that
    returns samples); else ``model(observations)``.
    """
    if apply_fn is not None:
        if not callable(apply_fn):
            raise TypeError("`apply_fn` must be callable (model, obs) -> out.")
        return apply_fn
    if callable(getattr(type(model), "policy_outputs", None)):
        return _call_policy_outputs
    try:
        inspect.signature(model.__call__).bind(None)
    except TypeError:
        raise TypeError(
            f"the trainer gets the policy as `model(observations)`, but "
            f"{type(model).__name__}.__call__ takes other arguments "
            f"{inspect.signature(model.__call__)}. Give the model a method "
            f"that returns the policy's distribution (or logits) from the "
            f"observations alone, e.g.\n"
            f"    def policy_outputs(self, observations):\n"
            f"        return distrax.Normal(self.mean(observations), "
            f"jnp.exp(self.log_std))\n"
            f"or pass `apply_fn=lambda model, observations: ...`.") from None
    except ValueError:  # no introspectable signature: try at the call
        pass
    return _call


def _token_model(apply_fn, model):
    """What :mod:`artifex_fn.sampling` calls: the model itself when it is
    called plainly (so that a decoder is used as one), else ``apply_fn``
    bound to it."""
    if apply_fn is _call:
        return model
    return functools.partial(apply_fn, model)


def _token_apply_fn(apply_fn, generation):
    def apply(model, observations):
        return sampling.token_policy(_token_model(apply_fn, model),
                                     observations,
                                     **generation.transform_kwargs())
    return apply


class _RLTrainer(Trainer):
    """Shared machinery of the algorithm trainers."""

    _algorithm: Any = None
    model_fields = ("policy",)

    @property
    def model_fields_hint(self) -> str:
        name = self._algorithm.__name__.rsplit(".", 1)[-1]
        return (f"the trainer's policy is the model. Use the functional API "
                f"(artifex_fn.{name}) with your own policy function")

    def __init__(self, model, optimizer, config=None, *, reference_model=None,
                 lora_reference: bool = False,
                 ref_sync_steps: int | None = None, ref_sync_mix: float = 1.0,
                 generation: sampling.GenerationConfig | None = None,
                 apply_fn=None, key=None):
        super().__init__(model, optimizer, config, key=key)
        self.generation = generation or sampling.GenerationConfig()
        self.apply_fn = resolve_apply_fn(model, apply_fn)
        self.reference_model = reference_model
        self.lora_reference = bool(lora_reference)
        uses_reference = reference_model is not None or self.lora_reference
        if uses_reference and not hasattr(self._algorithm,
                                          "with_reference_log_probs"):
            raise ValueError(
                f"{type(self).__name__} does not use a reference model "
                "(only GRPO, DPO, online DPO, KTO and PPO do): drop "
                "`reference_model` / `lora_reference`.")
        if reference_model is not None:
            if self.lora_reference:
                raise ValueError(
                    "give either `reference_model` or `lora_reference=True` "
                    "(the policy with its LoRA adapters off), not both.")
            if not isinstance(reference_model, nnx.Module):
                raise TypeError("`reference_model` must be a flax.nnx.Module.")
            self._ref_graphdef = nnx.graphdef(reference_model)
            self._ref = VariableBinding(reference_model)
            self._ref_apply_fn = resolve_apply_fn(reference_model, apply_fn)
        if self.lora_reference:
            self._lora_leaves = (
                tuple(isinstance(v, nnx.LoRAParam)
                      for v in self._params.variables),
                tuple(isinstance(v, nnx.LoRAParam)
                      for v in self._rest.variables))
            if not any(self._lora_leaves[0] + self._lora_leaves[1]):
                raise ValueError(
                    "`lora_reference=True` needs a model with LoRA adapters "
                    "(nnx.LoRAParam variables, e.g. from nnx.LoRA / "
                    "nnx.LoRALinear or artifex_fn.lora.add_lora); "
                    f"{type(model).__name__} has none.")
            if not all(self._lora_leaves[0]):
                raise ValueError(
                    "`lora_reference=True` takes the frozen base as the "
                    "reference, so only the adapters may be trained: build "
                    "the optimiser with `nnx.Optimizer(model, tx, "
                    "wrt=nnx.LoRAParam)` (its `wrt` now also selects base "
                    "weights, which would move the reference).")
        self._init_ref_sync(ref_sync_steps, ref_sync_mix)
        self._update = jax.jit(self._pure_update)
        self._evaluate = jax.jit(self._pure_evaluate)
        self.last_rollout = None

    def _init_ref_sync(self, steps, mix):
        """Reference refresh every ``steps`` steps: ``ref <- mix * policy +
        (1 - mix) * ref`` (a hard copy at ``mix = 1``; TR-DPO's soft
        update below)."""
        self.ref_sync_steps, self.ref_sync_mix = steps, float(mix)
        if steps is None:
            return
        if self.reference_model is None:
            raise ValueError(
                "`ref_sync_steps` refreshes `reference_model` from the "
                "policy: pass a `reference_model` (a LoRA reference needs no "
                "refresh).")
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(
                f"`ref_sync_steps` must be an int >= 1, got {steps!r}.")
        if not 0.0 < self.ref_sync_mix <= 1.0:
            raise ValueError(
                f"`ref_sync_mix` must be in (0, 1], got {mix!r}.")
        self._policy_all = VariableBinding(self.model)
        if (jax.tree_util.tree_structure(self._policy_all.read())
                != jax.tree_util.tree_structure(self._ref.read())):
            raise ValueError(
                "`ref_sync_steps` needs a `reference_model` with the "
                "policy's structure (the same module class and sizes).")
        self._sync = jax.jit(_mix_into)

    def _maybe_sync_reference(self) -> None:
        if self.ref_sync_steps and self.step % self.ref_sync_steps == 0:
            self._ref.write(self._sync(self._policy_all.read(),
                                       self._ref.read(),
                                       np.float32(self.ref_sync_mix)))

    # -- pieces used inside the compiled functions ------------------------
    def _policy_apply_fn(self, apply_fn):
        if self.generation.autoregressive:
            return _token_apply_fn(apply_fn, self.generation)
        return apply_fn

    def _policy(self, rest):
        return functools.partial(_apply, self.graphdef, rest,
                                 self._policy_apply_fn(self.apply_fn))

    def _ref_policy(self):
        return functools.partial(_apply, self._ref_graphdef, None,
                                 self._policy_apply_fn(self._ref_apply_fn))

    def _full_config(self, config, rest):
        return dataclasses.replace(config, policy=self._policy(rest),
                                   optimizer=self.optimizer.tx)

    def _with_reference(self, config, ref_state, batch, params=None,
                        rest=None):
        """Adds the reference model's log-probs the batch lacks: from
        ``reference_model`` (``ref_state``) or, with ``lora_reference``,
        from ``params`` and ``rest`` with every LoRA adapter zeroed."""
        ref = self._reference_state(config, ref_state, params, rest)
        if ref is None:
            return batch
        return self._algorithm.with_reference_log_probs(ref, batch)

    def _reference_state(self, config, ref_state, params=None, rest=None):
        """A ``TrainState`` whose ``ref_params`` and ``config.policy`` score
        the reference (``None`` without one): the algorithms'
        ``with_reference_log_probs`` take it."""
        if self.lora_reference and params is not None:
            policy = functools.partial(_apply_pair, self.graphdef,
                                       self._policy_apply_fn(self.apply_fn))
            ref_state = lax.stop_gradient(
                (_zero_where(params, self._lora_leaves[0]),
                 _zero_where(rest, self._lora_leaves[1])))
        elif ref_state is None:
            return None
        else:
            policy = self._ref_policy()
        return TrainState(
            params=None, opt_state=None, step=None, key=None,
            ref_params=ref_state,
            config=dataclasses.replace(config, policy=policy))

    def _num_updates(self, config) -> int:
        return 1

    def _pure_update(self, params, rest, opt_state, opt_step, step, key,
                     ref_state, config, batch):
        config = self._full_config(config, rest)
        batch = self._with_reference(config, ref_state, batch, params, rest)
        state = TrainState(params=params, opt_state=opt_state,
                                  step=step, key=key, ref_params=None,
                                  config=config)
        new, metrics = self._algorithm.update(state, batch)
        return (new.params, new.opt_state,
                opt_step + self._num_updates(config), new.key, metrics)

    # -- generation -------------------------------------------------------
    @staticmethod
    def _prompts(batch):
        if isinstance(batch, dict):
            if "observations" not in batch:
                raise ValueError(
                    "a generation batch needs the prompts (or conditions) "
                    f"under 'observations'; got keys {sorted(batch)}.")
            return batch["observations"]
        return batch

    def _decodes(self) -> bool:
        """Whether generation goes through the decoder protocol (ragged,
        bucketed prompts and a key-value cache)."""
        return (self.generation.autoregressive and self.apply_fn is _call
                and sampling.is_decoder(self.model))

    def _host_prompts(self, batch):
        """The prompts (and their mask) as the compiled step takes them:
        for a decoder left-padded to the bucketed length (a list of token
        lists is accepted), else unchanged."""
        prompts = self._prompts(batch)
        mask = batch.get("prompt_mask") if isinstance(batch, dict) else None
        if self._decodes():
            gen = self.generation
            return sampling.pad_prompts(prompts, mask,
                                        pad_token_id=gen.pad_token_id,
                                        bucketing=gen.prompt_bucketing)
        if mask is not None:
            raise ValueError(
                "`prompt_mask` (padded prompts) needs a token model with the "
                "decoder protocol (see artifex_fn.sampling), called without "
                "`apply_fn`, and `generation.max_new_tokens` set.")
        return prompts, None

    def _pure_generate_update(self, params, rest, opt_state, opt_step, step,
                              state_key, ref_state, config, prompts,
                              prompt_mask, key, reward_dynamic, *,
                              reward_static):
        """Sample, score with a traceable reward, update: one program."""
        rollout, samples, conditions = self._pure_sample(
            params, rest, config, prompts, prompt_mask, key)
        reward_fn = _join_callable(reward_static, reward_dynamic)
        rewards, parts = reward_parts(reward_fn, samples, conditions)
        rewards = _check_rewards(rewards, rollout["log_probs"].shape[0])
        return self._pure_scored_update(
            params, rest, opt_state, opt_step, step, state_key, ref_state,
            config, rollout, samples, conditions, rewards, parts)

    def _jit_generation(self) -> None:
        """The compiled programs of :meth:`_generate_step`."""
        self._generate_update = jax.jit(
            self._pure_generate_update, static_argnames=("reward_static",))
        self._sample = jax.jit(self._pure_sample)
        self._scored_update = jax.jit(self._pure_scored_update)

    def _generate_step(self, batch, reward_fn, key, config):
        """Generate, score and update (the generating trainers' step):
        one compiled call with a traceable reward, or two around a reward
        that runs on the host. Subclasses provide ``_generate_update``,
        ``_sample`` and ``_scored_update``."""
        if not callable(reward_fn):
            raise TypeError("`reward_fn` must be callable.")
        prompts, prompt_mask = self._place_batch(self._host_prompts(batch))
        if key is None:
            self.key, key = jax.random.split(self.key)
        else:
            key = key_data(key)
        params, rest, opt_state, opt_step = self._read()
        ref = self._ref_arg()
        if self.jit_reward and not is_host_reward(reward_fn):
            static, dynamic = _split_callable(reward_fn)
            (params, opt_state, opt_step, self.key, metrics,
             self.last_rollout) = self._generate_update(
                params, rest, opt_state, opt_step, np.int32(self.step),
                self.key, ref, config, prompts, prompt_mask, key, dynamic,
                reward_static=static)
        else:
            rollout, samples, conditions = self._sample(
                params, rest, config, prompts, prompt_mask, key)
            rewards, parts = reward_parts(reward_fn, samples, conditions)
            rewards = _check_rewards(rewards, rollout["log_probs"].shape[0])
            (params, opt_state, opt_step, self.key, metrics,
             self.last_rollout) = self._scored_update(
                params, rest, opt_state, opt_step, np.int32(self.step),
                self.key, ref, config, rollout, samples, conditions,
                rewards, parts)
        self._write(params, opt_state, opt_step)
        self.step += 1
        self._maybe_sync_reference()
        return metrics

    # -- host side --------------------------------------------------------
    def _ref_arg(self):
        return None if self.reference_model is None else self._ref.read()

    def _prepare(self, batch):
        if not isinstance(batch, dict):
            raise TypeError(f"`batch` must be a dict, got {type(batch).__name__}.")
        return batch, self.config_arg()

    def train_step(self, batch) -> dict[str, jax.Array]:
        """One update on a collected batch; returns device metrics."""
        batch, config = self._prepare(batch)
        batch = self._place_batch(batch)
        params, rest, opt_state, opt_step = self._read()
        params, opt_state, opt_step, self.key, metrics = self._update(
            params, rest, opt_state, opt_step, np.int32(self.step), self.key,
            self._ref_arg(), config, batch)
        self._write(params, opt_state, opt_step)
        self.step += 1
        self._maybe_sync_reference()
        return metrics

    def compute_loss(self, model, batch, key=None):
        """``(loss, metrics)`` of the algorithm's loss for ``model``.

        Evaluates without updating anything (PPO: on the whole batch as one
        minibatch).
        """
        batch, config = self._prepare(batch)
        params = nnx.as_pure(nnx.state(model, self.optimizer.wrt))
        rest = nnx.as_pure(nnx.state(model, nnx.Not(self.optimizer.wrt)))
        return self._evaluate(params, rest, self._ref_arg(), config, batch)

    def _pure_evaluate(self, params, rest, ref_state, config, batch):
        config = self._full_config(config, rest)
        batch = self._with_reference(config, ref_state, batch, params, rest)
        return self._algorithm.loss(params, batch, config)


class REINFORCETrainer(_RLTrainer):
    """REINFORCE on an NNX policy: ``model(observations) -> logits | dist``.

    ``train_step(batch)`` with ``observations``, ``actions``, ``rewards``
    (``[B]`` one-step or ``[B, T]`` with optional ``dones``, ``mask``).
    Metrics: ``loss, policy_loss, entropy, mean_reward, reward_std,
    mean_return, grad_norm``.
    """
    _algorithm = _reinforce
    config_type = _reinforce.REINFORCEConfig


class PPOTrainer(_RLTrainer):
    """PPO on an NNX actor-critic: ``model(obs) -> (logits | dist, value)``.

    ``train_step(trajectory)`` runs GAE and ``num_epochs x
    num_minibatches`` clipped updates (see :mod:`artifex_fn.ppo` for the
    batch layout). Metrics: ``loss, policy_loss, value_loss, entropy,
    approx_kl, kl_divergence, clip_fraction, mean_reward, advantage_mean,
    advantage_std, explained_variance, grad_norm``.

    RLHF-PPO on a language model: with ``generation.max_new_tokens`` set
    and an actor-critic decoder (e.g.
    :class:`~artifex_fn.families.autoregressive.ActorCriticLM`, called
    without ``apply_fn``), ``train_step(batch, reward_fn, key)`` samples
    one completion per prompt of ``batch["observations"]`` (ragged prompts
    as for :class:`GRPOTrainer`), scores the values of the sampled tokens
    in the same pass that computes their log-probs, calls
    ``reward_fn(samples, conditions) -> [B]`` (a compiled function, a text
    reward on the host, or a trained
    :class:`~artifex_fn.reward_model.SequenceRewardModel`), and runs the
    PPO phase on the sequences: per-token reward ``-beta * KL_t`` against
    the reference (``reference_model``, or the LoRA base with
    ``lora_reference=True``) plus the score at the last token, GAE over
    tokens, whitened advantages. With ``config.kl_target`` the coefficient
    adapts after each step (``trainer.config.beta``). Extra metrics:
    ``score``, ``kl`` (per completion), ``non_score_reward``, ``beta``,
    ``completion_length`` and ``rewards/<name>/{mean,std}`` of a composite
    reward's parts. ``trainer.last_rollout`` holds the samples, conditions,
    rewards, log-probs and masks of the last step. A reference applies to
    sequence batches only (generated, or collected with ``rewards [B]`` and
    ``log_probs [B, L]``); trajectory batches of environments ignore it.
    """
    _algorithm = _ppo
    config_type = _ppo.PPOConfig

    def __init__(self, model, optimizer, config=None, *,
                 jit_reward: bool = True, **kwargs):
        # kwargs: reference_model, lora_reference, ref_sync_steps,
        # ref_sync_mix, generation, apply_fn, key (as for GRPOTrainer).
        super().__init__(model, optimizer, config, **kwargs)
        self.jit_reward = jit_reward
        self._jit_generation()

    def _num_updates(self, config) -> int:
        return config.num_epochs * config.num_minibatches

    def _policy_apply_fn(self, apply_fn):
        if self.generation.autoregressive:
            transform = self.generation.transform_kwargs()

            def token_actor_critic(model, observations):
                return sampling.token_actor_critic(
                    _token_model(apply_fn, model), observations, **transform)
            return token_actor_critic
        apply_fn = super()._policy_apply_fn(apply_fn)

        def actor_critic(model, observations):
            out = apply_fn(model, observations)
            ok = isinstance(out, (tuple, list)) and len(out) == 2
            if ok:  # the value: one number per sample
                shape = tuple(jnp.shape(out[1]))
                ok = len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)
            if not ok:
                raise ValueError(
                    f"PPOTrainer needs the model to return (distribution or "
                    f"logits, value) for the observations, with one value "
                    f"per sample; {type(model).__name__} returned "
                    f"{_describe(out)}. Give it a method returning both, "
                    f"e.g.\n"
                    f"    def policy_outputs(self, observations):\n"
                    f"        h = self.encoder(observations)\n"
                    f"        return distrax.Normal(self.mean(h), "
                    f"jnp.exp(self.log_std)), self.value_head(h)[..., 0]")
            return out
        return actor_critic

    def _ref_policy(self):
        if not self.generation.autoregressive:
            return super()._ref_policy()
        # The reference is a plain language model: its token distribution.
        return functools.partial(
            _apply, self._ref_graphdef, None,
            _token_apply_fn(self._ref_apply_fn, self.generation))

    # -- generation -------------------------------------------------------
    def _pure_sample(self, params, rest, config, prompts, prompt_mask, key):
        del config
        gen = self.generation
        model = (nnx.merge(self.graphdef, params, rest) if rest is not None
                 else nnx.merge(self.graphdef, params))
        decoder = _token_model(self.apply_fn, model)
        out = sampling.generate(decoder, prompts, key,
                                prompt_mask=prompt_mask,
                                **gen.sampling_kwargs())
        observations = dict(prompt=prompts, completion=out.tokens)
        if prompt_mask is not None:
            observations["prompt_mask"] = prompt_mask
        _, values = sampling.token_actor_critic(decoder, observations,
                                                **gen.transform_kwargs())
        rollout = dict(observations=observations, actions=out.tokens,
                       log_probs=lax.stop_gradient(out.log_probs),
                       values=lax.stop_gradient(values), mask=out.mask)
        return rollout, out.tokens, prompts

    def _pure_scored_update(self, params, rest, opt_state, opt_step, step,
                            state_key, ref_state, config, rollout, samples,
                            conditions, rewards, parts):
        info = {}
        for name, r in dict(parts, total=rewards).items():
            mean, std = jnp.mean(r), jnp.std(r)
            info[f"rewards/{name}/mean"] = mean
            info[f"rewards/{name}/std"] = std
        batch = dict(rollout, rewards=rewards)
        params, opt_state, opt_step, state_key, metrics = self._pure_update(
            params, rest, opt_state, opt_step, step, state_key, ref_state,
            config, batch)
        metrics = GRPOTrainer._rollout_metrics(dict(metrics, **info),
                                               rollout)
        last = dict(samples=samples, conditions=conditions, rewards=rewards,
                    log_probs=rollout["log_probs"], mask=rollout["mask"],
                    values=rollout["values"],
                    prompt_mask=rollout["observations"].get("prompt_mask"))
        return params, opt_state, opt_step, state_key, metrics, last

    def train_step(self, batch, reward_fn=None, key=None):
        """A PPO phase on a collected batch, or (with ``reward_fn``)
        generate, score and train (class docstring)."""
        if reward_fn is None:
            if key is not None:
                raise ValueError("`key` is only used with `reward_fn`.")
            metrics = super().train_step(batch)
            self._adapt_beta(metrics)
            return metrics
        if not self.generation.autoregressive:
            raise ValueError(
                "PPOTrainer generates from token models only: set "
                "`generation=GenerationConfig(max_new_tokens=...)` and give "
                "an actor-critic decoder (artifex_fn.families.autoregressive."
                "ActorCriticLM).")
        metrics = self._generate_step(batch, reward_fn, key,
                                      self.config_arg())
        self._adapt_beta(metrics)
        return metrics

    def _adapt_beta(self, metrics) -> None:
        """The adaptive KL controller's next coefficient, into the config
        (a traced number: no recompilation)."""
        if self.config.kl_target is not None and "next_beta" in metrics:
            self.config = dataclasses.replace(
                self.config, beta=float(metrics["next_beta"]))


class _GroupSampler(_RLTrainer):
    """Generating trainers that sample ``config.num_generations``
    responses per prompt (GRPO, online DPO): the sampling program, the
    rollout record and ``train_step(batch, reward_fn, key)``."""

    def __init__(self, model, optimizer, config=None, *,
                 jit_reward: bool = True, **kwargs):
        super().__init__(model, optimizer, config, **kwargs)
        self.jit_reward = jit_reward
        self._jit_generation()

    def _pure_sample(self, params, rest, config, prompts, prompt_mask, key):
        g = config.num_generations
        conditions, prompt_mask = jax.tree_util.tree_map(
            lambda x: jnp.repeat(x, g, axis=0), (prompts, prompt_mask))
        gen = self.generation
        if gen.autoregressive:
            model = (nnx.merge(self.graphdef, params, rest) if rest is not None
                     else nnx.merge(self.graphdef, params))
            out = sampling.generate(
                _token_model(self.apply_fn, model), conditions, key,
                prompt_mask=prompt_mask, **gen.sampling_kwargs())
            observations = dict(prompt=conditions, completion=out.tokens)
            if prompt_mask is not None:
                observations["prompt_mask"] = prompt_mask
            rollout = dict(observations=observations, actions=out.tokens,
                           log_probs=lax.stop_gradient(out.log_probs),
                           mask=out.mask)
            if gen.eos_token_id is not None or gen.stop_token_ids:
                rollout["truncated"] = truncated_completions(
                    out.tokens, out.mask, eos_token_id=gen.eos_token_id,
                    stop_token_ids=gen.stop_token_ids)
            samples = out.tokens
        else:
            model_apply = functools.partial(_apply, self.graphdef, rest,
                                            self.apply_fn, params)
            samples, log_probs = sampling.sample_one_step(
                model_apply, conditions, key)
            rollout = dict(observations=conditions, actions=samples,
                           log_probs=lax.stop_gradient(log_probs))
        return rollout, samples, conditions

    def _update_on_rollout(self, update_args, batch, info, rollout,
                           samples, conditions, rewards):
        """The update on a scored batch, its metrics joined with ``info``
        and the rollout's, and the record of ``last_rollout``."""
        params, opt_state, opt_step, state_key, metrics = self._pure_update(
            *update_args, batch)
        metrics = self._rollout_metrics(dict(metrics, **info), rollout)
        return (params, opt_state, opt_step, state_key, metrics,
                self._last_rollout(rollout, samples, conditions, rewards))

    @staticmethod
    def _last_rollout(rollout, samples, conditions, rewards):
        """What ``trainer.last_rollout`` holds after a generating step."""
        obs = rollout["observations"]
        return dict(samples=samples, conditions=conditions, rewards=rewards,
                    log_probs=rollout["log_probs"], mask=rollout.get("mask"),
                    prompt_mask=(obs.get("prompt_mask")
                                 if isinstance(obs, dict) else None))

    @staticmethod
    def _rollout_metrics(metrics, rollout):
        if "mask" in rollout:
            metrics = dict(metrics, completion_length=jnp.mean(
                jnp.sum(rollout["mask"], axis=1)))
        return metrics

    def train_step(self, batch, reward_fn=None, key=None):
        """Update on collected groups, or generate-score-update with a reward.

        Args:
          batch: collected groups (the algorithm's batch layout), or, with
            ``reward_fn``, prompts/conditions under ``observations``.
          reward_fn: ``(samples, conditions) -> rewards [B * G]``.
          key: PRNG key for sampling (default: split from the trainer key).

        Returns:
          Device metrics; with generation also ``completion_length`` for
          token models.
        """
        if reward_fn is None:
            if key is not None:
                raise ValueError("`key` is only used with `reward_fn`.")
            return _RLTrainer.train_step(self, batch)
        config = self.config_arg()
        if isinstance(batch, dict) and "group_size" in batch:
            config = dataclasses.replace(
                config, num_generations=_grpo.group_size_of(batch, config))
        return self._generate_step(batch, reward_fn, key, config)


class GRPOTrainer(_GroupSampler):
    """GRPO on an NNX policy, from collected groups or by generating them.

    Args:
      model, optimizer, config: as for every trainer.
      reference_model: optional frozen ``nnx.Module`` scoring
        ``ref_log_probs`` for the KL penalty (never updated, except by
        ``ref_sync_steps``). Without it the penalty applies only when the
        batch carries ``ref_log_probs`` or with ``lora_reference``.
      lora_reference: the reference is the model itself with every
        ``nnx.LoRAParam`` zeroed, i.e. its frozen base (the optimiser must
        train the adapters only: ``wrt=nnx.LoRAParam``); no second copy.
      ref_sync_steps, ref_sync_mix: every ``ref_sync_steps`` steps set the
        ``reference_model`` to ``mix * policy + (1 - mix) * reference``
        (hard copy at ``mix = 1``, TR-DPO's soft update below).
      generation: :class:`~artifex_fn.training.GenerationConfig`; set
        ``max_new_tokens`` for autoregressive token models.
      jit_reward: trace ``reward_fn`` into the compiled generation step
        (default). Set False for rewards that run on the host (then the
        step is two compiled calls around the reward); rewards that read
        decoded text (:class:`~artifex_fn.training.TextReward`, and
        combinators of them) always run on the host.
      keep_groups: dynamic sampling (DAPO): of the groups generated for
        the batch's prompts, train on the first ``keep_groups`` whose
        rewards differ (:func:`artifex_fn.grpo.select_batch`); unfilled slots
        are masked out. Logs ``dynamic_sampling/fill_rate``.
      apply_fn: optional ``(model, observations) -> outputs`` (see the
        module docstring); for token models it must return logits.
      key: the trainer's PRNG seed.

    A generating step also logs, over every generated sample,
    ``rewards/<name>/{mean,std,frac_zero_std}`` for each named part of a
    :class:`~artifex_fn.training.CompositeReward` and for ``total``. With
    stop tokens in ``generation`` the rollout flags truncated completions
    (``batch["truncated"]``), which
    ``GRPOConfig.mask_truncated_completions`` leaves out of the loss.

    ``train_step(batch)`` trains on pre-collected groups (keys as in
    :mod:`artifex_fn.grpo`; ``batch["group_size"]`` may override
    ``num_generations``). ``train_step(batch, reward_fn, key)`` generates:
    each row of ``batch["observations"]`` is repeated ``num_generations``
    times, sampled from the current policy, scored by
    ``reward_fn(samples, conditions)``, and used for one update with its
    behaviour (and reference) log-probs. ``trainer.last_rollout`` then
    holds the ``samples``, the ``conditions`` they were drawn for, the
    ``rewards``, the behaviour ``log_probs`` and, for token models, the
    completion ``mask`` and the ``prompt_mask``.

    Token models (``generation.max_new_tokens`` set) are sampled by
    :func:`artifex_fn.sampling.generate` with the generation config's
    temperature, top-k, top-p and stop tokens; the loss scores the
    completions under the same transformed distribution, and the behaviour
    log-probs are the sampler's. A model with the decoder protocol (e.g.
    :class:`~artifex_fn.families.autoregressive.TinyCausalLM`, used without
    ``apply_fn``) is decoded with its key-value cache, and its prompts may
    be ragged: ``observations`` a list of token lists, or ``[B, Lp]`` ids
    with ``batch["prompt_mask"]`` (``0`` on the left padding). Prompts are
    left-padded to ``generation.prompt_bucketing`` (powers of two by
    default, so a stream of lengths compiles one program per bucket), and
    ``reward_fn`` sees them so padded. Under :meth:`shard` generation runs
    data-parallel like the update.
    """
    _algorithm = _grpo
    config_type = _grpo.GRPOConfig

    def __init__(self, model, optimizer, config=None, *,
                 jit_reward: bool = True, keep_groups: int | None = None,
                 **kwargs):
        # kwargs: reference_model, lora_reference, ref_sync_steps,
        # ref_sync_mix, generation, apply_fn, key (the class docstring).
        super().__init__(model, optimizer, config, jit_reward=jit_reward,
                         **kwargs)
        if keep_groups is not None and (
                not isinstance(keep_groups, (int, np.integer))
                or keep_groups < 1):
            raise ValueError(
                f"`keep_groups` must be an int >= 1, got {keep_groups!r}.")
        self.keep_groups = keep_groups
        if self.config.mask_truncated_completions and not (
                self.generation.eos_token_id is not None
                or self.generation.stop_token_ids):
            raise ValueError(
                "`mask_truncated_completions` needs the generation's stop "
                "tokens (`generation.eos_token_id` or `stop_token_ids`) to "
                "tell a finished completion from a truncated one.")

    def _num_updates(self, config) -> int:
        return config.num_epochs * config.num_minibatches

    def _prepare(self, batch):
        batch, config = super()._prepare(batch)
        if "group_size" in batch:
            size = _grpo.group_size_of(batch, config)
            batch = {k: v for k, v in batch.items() if k != "group_size"}
            config = dataclasses.replace(config, num_generations=size)
        return batch, config

    def _pure_scored_update(self, params, rest, opt_state, opt_step, step,
                            state_key, ref_state, config, rollout, samples,
                            conditions, rewards, parts):
        """The update on a scored rollout: reward metrics on every sample,
        then (with ``keep_groups``) dynamic sampling, then the update."""
        g = config.num_generations
        info = _grpo.reward_metrics(dict(parts, total=rewards), group_size=g)
        batch = dict(rollout, rewards=rewards)
        if self.keep_groups is not None:
            batch, sel = _grpo.select_batch(batch, num_groups=self.keep_groups,
                                            group_size=g)
            info["dynamic_sampling/fill_rate"] = sel.fill_rate
            info["dynamic_sampling/qualifying_groups"] = (
                sel.num_qualifying.astype(jnp.float32))
        return self._update_on_rollout(
            (params, rest, opt_state, opt_step, step, state_key, ref_state,
             config), batch, info, rollout, samples, conditions, rewards)


class OnlineDPOTrainer(_GroupSampler):
    """Online DPO (:mod:`artifex_fn.online_dpo`): DPO on best-versus-worst
    pairs of the current policy's own samples.

    ``train_step(batch, reward_fn, key)`` samples ``num_generations``
    responses for each prompt of ``batch["observations"]`` exactly as
    :class:`GRPOTrainer` does (token models with the key-value cache and
    ragged prompts, or one-step policies), ranks each group with
    ``reward_fn(samples, conditions)`` (a function, a text reward on the
    host, or a trained :class:`~artifex_fn.reward_model.SequenceRewardModel`),
    and takes one DPO step on the best against the worst of every group
    whose rewards differ; ties are left out. ``train_step(batch)`` trains
    on collected groups (keys of :mod:`artifex_fn.online_dpo`). The
    reference is ``reference_model`` (refreshed every ``ref_sync_steps``
    steps if set), the LoRA base with ``lora_reference=True``, or none with
    ``reference_free=True`` (SimPO's loss on the pairs).

    Metrics: those of :func:`artifex_fn.online_dpo.update` (``loss,
    reward_accuracy, reward_margin, decisive_pairs, chosen_score,
    rejected_score, ...``), ``rewards/<name>/{mean,std,frac_zero_std}``
    over every sample and ``completion_length`` for token models;
    ``trainer.last_rollout`` as for :class:`GRPOTrainer`.
    """
    _algorithm = _online_dpo
    config_type = _online_dpo.OnlineDPOConfig

    def _with_reference(self, config, ref_state, batch, params=None,
                        rest=None):
        """The reference scores the pairs' rows only (``2 N`` sequences
        instead of ``K N``: :func:`artifex_fn.online_dpo.pair_rows`); the
        other rows' ``ref_log_probs`` are 0, which the update never reads."""
        ref = self._reference_state(config, ref_state, params, rest)
        if (ref is None or config.reference_free
                or "ref_log_probs" in batch or "rewards" not in batch):
            # (Without rewards the update names what is missing.)
            return batch
        g = config.num_generations
        chosen, rejected = _online_dpo.pair_rows(batch["rewards"],
                                                 group_size=g)
        pairs, _, _ = _online_dpo.select_pairs(batch, group_size=g)
        scored = _dpo.with_reference_log_probs(
            ref, {k: pairs[k] for k in ("chosen", "rejected")})
        n_rows = jnp.shape(batch["rewards"])[0]
        ref_log_probs = (
            jnp.zeros((n_rows,), scored["ref_chosen_log_probs"].dtype)
            .at[chosen].set(scored["ref_chosen_log_probs"])
            .at[rejected].set(scored["ref_rejected_log_probs"]))
        return dict(batch, ref_log_probs=ref_log_probs)

    def _pure_scored_update(self, params, rest, opt_state, opt_step, step,
                            state_key, ref_state, config, rollout, samples,
                            conditions, rewards, parts):
        info = _grpo.reward_metrics(dict(parts, total=rewards),
                                    group_size=config.num_generations)
        batch = {k: rollout[k] for k in ("observations", "actions", "mask")
                 if k in rollout}
        batch["rewards"] = rewards
        return self._update_on_rollout(
            (params, rest, opt_state, opt_step, step, state_key, ref_state,
             config), batch, info, rollout, samples, conditions, rewards)


class DPOTrainer(_RLTrainer):
    """DPO / SimPO on an NNX policy scoring preference pairs.

    ``train_step(batch)`` with ``{"chosen": {"observations", "actions",
    "mask"?}, "rejected": {...}}`` scores both responses with the model
    (masked token log-prob sums; SimPO: length-normalised) and takes one
    gradient step. Reference log-probs come from the batch
    (``ref_chosen_log_probs`` / ``ref_rejected_log_probs``), from
    ``reference_model`` (refreshed every ``ref_sync_steps`` steps if set,
    as in TR-DPO) or, with ``lora_reference=True``, from the model with its
    LoRA adapters off (see :class:`GRPOTrainer`); ``reference_free=True``
    (SimPO) needs none.

    A batch of precomputed ``chosen_log_probs`` / ``rejected_log_probs``
    (the guide's example) carries no gradient to the model: the step
    returns the loss and metrics and leaves the parameters unchanged, with
    a warning.
    """
    _algorithm = _dpo
    config_type = _dpo.DPOConfig

    def __init__(self, model, optimizer, config=None, **kwargs):
        # kwargs: reference_model, lora_reference, ref_sync_steps,
        # ref_sync_mix, generation, apply_fn, key (see GRPOTrainer).
        super().__init__(model, optimizer, config, **kwargs)
        self._warned_flat = False

    def train_step(self, batch) -> dict[str, jax.Array]:
        """One DPO/SimPO step; see the class docstring for batch forms."""
        if isinstance(batch, dict) and "chosen" not in batch:
            if not self._warned_flat:
                warnings.warn(
                    "DPOTrainer.train_step got precomputed log-probs "
                    "('chosen_log_probs', ...): they carry no gradient, so "
                    "the model is not updated. Pass {'chosen': {...}, "
                    "'rejected': {...}} inputs for the model to score.",
                    UserWarning, stacklevel=2)
                self._warned_flat = True
            _, metrics = self.compute_loss(self.model, batch)
            self.step += 1
            return metrics
        return super().train_step(batch)


class RewardModelTrainer(_RLTrainer):
    """Trains a reward model on preference pairs (:mod:`artifex_fn.reward_model`).

    The model scores observations: by default its
    ``policy_outputs(observations)`` (a
    :class:`~artifex_fn.reward_model.SequenceRewardModel` scores
    ``{"tokens": [B, L], "mask": [B, L]}``) or ``apply_fn(model,
    observations) -> [B]``.

    ``train_step({"chosen": obs, "rejected": obs, "margin"?: [B]})`` takes
    one gradient step on the mean Bradley-Terry loss; metrics ``loss,
    accuracy, margin, chosen_reward, rejected_reward, grad_norm``.
    ``compute_loss(model, batch)`` evaluates held-out pairs. The trained
    model is itself a reward function (``model(samples, conditions)``):
    pass it to ``GRPOTrainer.train_step`` or ``PPOTrainer.train_step`` as
    ``reward_fn``; its weights travel as arrays, so retraining it does not
    recompile them.
    """
    _algorithm = _reward_model
    config_type = _reward_model.RewardModelConfig
    model_fields = ("model",)

    @property
    def model_fields_hint(self) -> str:
        return ("the trainer's reward function is the model. Use the "
                "functional API (artifex_fn.reward_model) with your own "
                "function")

    def _full_config(self, config, rest):
        return dataclasses.replace(config, model=self._policy(rest),
                                   optimizer=self.optimizer.tx)


def _check_rewards(rewards, n):
    rewards = jnp.asarray(rewards)
    if rewards.shape != (n,):
        raise ValueError(
            f"reward_fn must return rewards of shape ({n},) (one per "
            f"sample), got {tuple(rewards.shape)}.")
    return rewards


def _describe(out) -> str:
    if hasattr(out, "shape"):
        return f"an array of shape {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        return (f"a {type(out).__name__} of {len(out)}: "
                + ", ".join(_describe(x) for x in out))
    return type(out).__name__


class _ByIdentity:
    """Hashable, identity-compared holder of a static callable."""

    def __init__(self, fn):
        self.fn = fn

    def __hash__(self):
        return id(self.fn)

    def __eq__(self, other):
        return isinstance(other, _ByIdentity) and other.fn is self.fn


def _is_array_like(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, int, float,
                          complex)) and not isinstance(x, bool)


def _split_callable(fn):
    """``(static, dynamic)`` parts of a reward function for ``jax.jit``.

    NNX modules pass their state as arrays; pytrees of numbers (the reward
    combinators) pass their leaves; anything else is static.
    """
    if isinstance(fn, nnx.Module):
        graphdef, state = nnx.split(fn)
        return ("nnx", graphdef), nnx.as_pure(state)
    leaves, treedef = jax.tree_util.tree_flatten(fn)
    if leaves and all(_is_array_like(x) for x in leaves) and not (
            len(leaves) == 1 and leaves[0] is fn):
        return ("tree", treedef), leaves
    return ("static", _ByIdentity(fn)), None


def _join_callable(static, dynamic):
    kind, meta = static
    if kind == "nnx":
        return nnx.merge(meta, dynamic)
    if kind == "tree":
        return jax.tree_util.tree_unflatten(meta, dynamic)
    return meta.fn
