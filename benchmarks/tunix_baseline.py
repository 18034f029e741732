"""tunix's side of the same-process sampler / GRPO benchmark.

Everything here runs tunix's own code at a small shape on the default JAX
backend; each callable is warmed up (compiled) before it is returned and
blocks until its results are ready, so a timer around it measures steady
state, not compilation.

* :func:`make_model` builds tunix's Qwen3 (``tunix.models.qwen3.model``):
  RMSNorm, RoPE, q/k-norm, SwiGLU MLP, ``head_dim = embed_dim // num_heads``,
  ``num_kv_heads = num_heads`` (no grouped-query sharing) and an untied
  output head, as in a plain transformer with a separate output layer.
* :func:`make_sampler_run` calls ``tunix.generate.sampler.Sampler`` through
  its public ``__call__``: host tokenization of the prompts, a jitted prefill,
  a jitted ``lax.while_loop`` decode over a KV cache of exactly
  ``prompt_len + max_new_tokens`` positions, categorical sampling at
  ``temperature`` (``top_p=1.0``, the full vocabulary), host detokenization.
  The ids come from :class:`IntTokenizer`, whose pad and EOS ids lie outside
  the model's vocabulary, so no row can end early and every call produces
  ``batch * max_new_tokens`` tokens.
* :func:`make_grpo_step` drives tunix's ``GRPOLearner`` on an ``RLCluster``
  (vanilla rollout = the Sampler above, a reference model that is a copy of
  the policy, ``num_iterations=1``, Adam). The phases are tunix's own
  methods: ``generate`` is ``RLCluster.generate``, ``reference`` is
  ``RLCluster.get_ref_per_token_logps``, ``update`` is
  ``RLCluster.update_actor`` (tunix's trainer: ``nnx.value_and_grad`` of its
  ``grpo_loss_fn``, then the optimizer) on a prepared ``TrainExample``, and
  ``step`` is one whole ``GRPOLearner.train`` call on a one-batch data set:
  generation, reference log-probs, the reward function, group advantages
  and the policy update, with tunix's own queueing between them.
* :func:`make_forward_backward` jits one full-sequence forward of the Qwen3
  model (logits) and one forward+backward (the gradient of the mean
  next-token log-probability), written here around the model call.

Run as a script to print median (min-max) wall-clock timings.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

try:
    import importlib.metadata as _metadata

    from tunix.generate import sampler as _sampler
    from tunix.models.qwen3 import model as _qwen3
    from tunix.rl import common as _common
    from tunix.rl import rl_cluster as _rlc
    from tunix.rl.grpo import grpo_learner as _grpo
    from tunix.rl.rollout import base_rollout as _rollout

    VERSION = _metadata.version("google-tunix")
    AVAILABLE, REASON = True, ""
except Exception as _err:  # pylint: disable=broad-exception-caught
    AVAILABLE, VERSION = False, ""
    REASON = f"tunix is not importable: {type(_err).__name__}: {_err}"


class IntTokenizer:
    """Token ids written as space-separated integers: the minimal interface
    (``encode``, ``decode``, ``bos_id``, ``eos_id``, ``pad_id``) tunix's
    ``TokenizerAdapter`` accepts. No BOS; pad and EOS are ``vocab_size`` and
    ``vocab_size + 1``, ids the model can never sample."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text, **kwargs):
        del kwargs
        return [int(t) for t in text.split()]

    def decode(self, ids, **kwargs):
        del kwargs
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return None

    def pad_id(self):
        return self.vocab_size

    def eos_id(self):
        return self.vocab_size + 1


def _require():
    if not AVAILABLE:
        raise RuntimeError(REASON)


def _prompts(vocab_size, n, length, seed):
    ids = np.random.default_rng(seed).integers(0, vocab_size, (n, length))
    return [" ".join(map(str, row)) for row in ids]


def _block_on_model(model):
    jax.block_until_ready(jax.tree.leaves(nnx.state(model, nnx.Param)))


def make_model(*, vocab_size=512, num_layers=2, embed_dim=128, num_heads=4,
               hidden_dim=512, seed=0, dtype=jnp.float32):
    """tunix's ``Qwen3`` at this shape (parameters and compute in ``dtype``)."""
    _require()
    config = _qwen3.ModelConfig(
        num_layers=num_layers, vocab_size=vocab_size, embed_dim=embed_dim,
        hidden_dim=hidden_dim, num_heads=num_heads,
        head_dim=embed_dim // num_heads, num_kv_heads=num_heads,
        rope_theta=1_000_000, norm_eps=1e-6, use_tied_embedding=False,
        dtype=dtype, param_dtype=dtype)
    return _qwen3.Qwen3(config, rngs=nnx.Rngs(seed))


def make_sampler_run(model, *, batch=32, prompt_len=16, max_new_tokens=64,
                     temperature=1.0, seed=0):
    """Warm ``run() -> new tokens`` of one ``Sampler`` call on ``batch``
    random prompts of ``prompt_len`` ids (a new sampling seed per call)."""
    _require()
    cfg = model.config
    tokenizer = IntTokenizer(cfg.vocab_size)
    sampler = _sampler.Sampler(model, tokenizer, _sampler.CacheConfig(
        cache_size=prompt_len + max_new_tokens, num_layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim))
    prompts = _prompts(cfg.vocab_size, batch, prompt_len, seed)
    calls = iter(range(seed, seed + 2**31))

    def run():
        out = sampler(prompts, max_generation_steps=max_new_tokens,
                      max_prompt_length=prompt_len, echo=False,
                      temperature=temperature,
                      top_p=1.0 if temperature > 0 else None,
                      seed=next(calls))
        jax.block_until_ready(out.tokens)
        return sum(len(t) for t in out.tokens)

    produced = run()
    if produced != batch * max_new_tokens:
        raise RuntimeError(f"sampler produced {produced} tokens, expected "
                           f"{batch * max_new_tokens}")
    return run


def _count_reward(token):
    def reward(prompts, completions, **kwargs):
        del prompts, kwargs
        return [float(c.split().count(token)) for c in completions]
    return reward


def make_grpo_step(model, *, num_prompts=8, num_generations=4, prompt_len=16,
                   max_new_tokens=32, beta=0.04, learning_rate=1e-5, seed=0):
    """Warm phases of one tunix GRPO step.

    Returns ``{"generate", "reference", "update", "step"}`` zero-argument
    callables (see the module docstring for what each one runs).
    ``RLCluster`` places its own copy of ``model`` on a one-device mesh and
    trains that copy (the rollout shares its weights); ``model`` itself and
    the reference copy stay unchanged."""
    _require()
    cfg = model.config
    tokenizer = IntTokenizer(cfg.vocab_size)
    pad, eos = tokenizer.pad_id(), tokenizer.eos_id()
    graphdef, state = nnx.split(model)
    reference = nnx.merge(graphdef, jax.tree.map(jnp.array, state))  # copy
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                             ("fsdp", "tp"))
    roles = (_rlc.Role.ACTOR, _rlc.Role.REFERENCE, _rlc.Role.ROLLOUT)
    cluster = _rlc.RLCluster(
        actor=model, reference=reference, tokenizer=tokenizer,
        cluster_config=_rlc.ClusterConfig(
            role_to_mesh={role: mesh for role in roles},
            rollout_engine="vanilla", offload_to_cpu=False,
            training_config=_rlc.RLTrainingConfig(
                actor_optimizer=optax.adam(learning_rate),
                eval_every_n_steps=2**30, max_steps=2**30,
                rollout_micro_batch_size=num_prompts,
                compute_logps_micro_batch_size=num_prompts),
            rollout_config=_rollout.RolloutConfig(
                max_tokens_to_generate=max_new_tokens,
                max_prompt_length=prompt_len,
                kv_cache_size=prompt_len + max_new_tokens,
                temperature=1.0, top_p=1.0, top_k=None, seed=seed)))
    learner = _grpo.GRPOLearner(
        rl_cluster=cluster,
        algo_config=_grpo.GRPOConfig(num_generations=num_generations,
                                     num_iterations=1, beta=beta),
        reward_fns=[_count_reward(str(cfg.vocab_size // 2))])

    prompts = np.array(_prompts(cfg.vocab_size, num_prompts, prompt_len, seed))
    repeated = list(np.repeat(prompts, num_generations))
    rows = len(repeated)
    # pylint: disable-next=protected-access
    example = learner._generate_and_compute_advantage({"prompts": repeated})
    if example.completion_ids.shape != (rows, max_new_tokens) or (
            not bool(example.completion_mask.all())):
        raise RuntimeError("tunix's rollout ended some completions early")

    def generate():
        out = cluster.generate(repeated, mode=_rlc.Mode.TRAIN,
                               micro_batch_size=rows)
        jax.block_until_ready(out.tokens)

    def reference_logps():
        jax.block_until_ready(cluster.get_ref_per_token_logps(
            example.prompt_ids, example.completion_ids, pad, eos,
            micro_batch_size=rows))

    def update():
        cluster.update_actor([example], None)
        _block_on_model(cluster.actor_trainer.model)

    def step():
        learner.train([{"prompts": prompts}])
        _block_on_model(cluster.actor_trainer.model)

    phases = {"generate": generate, "reference": reference_logps,
              "update": update, "step": step}
    for fn in phases.values():
        fn()
    return phases


def make_forward_backward(model, *, batch=32, seq_len=48, seed=0):
    """Warm ``(forward, forward_backward)`` of the model on random tokens."""
    _require()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(seed), (batch, seq_len), 0,
                                model.config.vocab_size)
    mask = jnp.ones((batch, seq_len), dtype=jnp.bool_)
    positions = _common.build_positions_from_mask(mask)
    attn_mask = _common.make_causal_attn_mask(mask)

    def logits_of(params, rest, tokens):
        logits, _ = nnx.merge(graphdef, params, rest)(
            tokens, positions, None, attn_mask)
        return logits

    def mean_log_prob(params, rest, tokens):
        logp = jax.nn.log_softmax(logits_of(params, rest, tokens)[:, :-1])
        return jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    fwd = jax.jit(logits_of)
    fwd_bwd = jax.jit(jax.value_and_grad(mean_log_prob))

    def forward():
        return jax.block_until_ready(fwd(params, rest, tokens))

    def forward_backward():
        return jax.block_until_ready(fwd_bwd(params, rest, tokens))

    forward()
    forward_backward()
    return forward, forward_backward


def _timings(fn, repeats):
    """(median, min, max) wall-clock seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def _ms(stats):
    med, lo, hi = (1e3 * t for t in stats)
    return f"{med:8.2f} ms  ({lo:.2f}-{hi:.2f})"


def main(repeats=7):
    """Print median wall-clock timings of every benchmark above."""
    if not AVAILABLE:
        print(REASON)
        return
    print(f"tunix {VERSION}, jax {jax.__version__}, backend "
          f"{jax.default_backend()}: median (min-max) of {repeats} calls")
    for new in (64, 256):
        run = make_sampler_run(make_model(), batch=32, prompt_len=16,
                               max_new_tokens=new)
        tokens = run()
        stats = _timings(run, repeats)
        print(f"sampler  batch 32, prompt 16, {new:3d} new, cache {16 + new:3d}"
              f": {_ms(stats)}  {tokens / stats[0]:6.0f} tok/s")
    phases = make_grpo_step(make_model())
    for name, fn in phases.items():
        print(f"grpo     8 prompts x 4, prompt 16, 32 new, {name:9s}: "
              f"{_ms(_timings(fn, repeats))}")
    forward, forward_backward = make_forward_backward(make_model())
    for name, fn in (("forward", forward),
                     ("forward+backward", forward_backward)):
        print(f"model    batch 32, length 48, {name:16s}: "
              f"{_ms(_timings(fn, repeats))}")


if __name__ == "__main__":
    main()
