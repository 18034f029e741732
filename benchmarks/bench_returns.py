"""Benchmark: discounted returns, lambda-returns and GAE against rlax.

Times ``afn.discounted_returns``, ``afn.lambda_returns`` and
``afn.gae_advantages`` (``method`` =
``"auto"``, ``"scan"`` and ``"associative"``) against the rlax equivalents
vmapped over the batch, on ``[B, T]`` float32 inputs (time on the last
axis) with about 1% of the steps terminal. Every implementation receives
the same arrays and is jitted; the rlax baselines build their per-step
discounts ``gamma * (1 - terminated)`` inside the jitted function, exactly
as the library does.

Before timing, every output is checked against rlax and against a float64
NumPy reference; a mismatch exits with status 1. Otherwise the exit status
is 0 whatever the ratios are: this is a report.

Measurement: the first call (trace + compile + one run) is reported as the
compile time. Then the implementations of one function and shape are
measured in interleaved rounds (the order rotates every round), each round
taking one sample per implementation, so that background load hits them
alike. A sample is the mean latency of a few back-to-back calls, each
blocked on with ``block_until_ready()``; the table reports the median over
the rounds and the ratio of medians to rlax measured in the same rounds.

What the time goes to on CPU (2-core AMD EPYC, jax 0.10.2, 2026-12-02):
vmapped rlax and a time-major ``lax.scan`` both transpose every ``[B, T]``
input to ``[T, B]`` (XLA emits an elementwise fusion, then a separate
transposing copy per input) and the result back. At 1024 x 64 the bare
recurrence on pre-transposed inputs took 0.25x rlax's time and the two input
transposes alone 0.40x: the transposes, not the loop, are the cost, which is
why the library's time-major GAE sat at 0.95-1.05x rlax. The CPU scan now
reads one time slice per step in the caller's layout (no transpose) and
forms the coefficients inside the step. Column reads stay cheap while the
rows being read fit the caches: over all 64 rows at T = 1024 (4 KiB rows,
which share cache sets) they took 1.8-2.0x rlax's time, so the rows are
scanned in groups (``lax.map``) of 8, or of 4 when a row is a multiple of
4 KiB (1024 x 64 GAE: 0.50x with 4 rows, 0.75x with 8, 1.5x with 16). See
``_cpu_layout`` in ``artifex_fn/_src/multistep.py``.

Usage::

    python benchmarks/bench_returns.py [--repeats N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import rlax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_model  # noqa: E402

import artifex_fn as afn
from artifex_fn._src.multistep import resolve_method

GAMMA = 0.99
LAMBDA = 0.95
TERMINATION_RATE = 0.01
SHAPES = ((128, 64), (1024, 64), (8192, 8))  # (T, B)
TARGET_RATIO = 1.0
RTOL = 1e-4
ATOL = 1e-4


# --------------------------------------------------------------------------
# Implementations. Every one takes the same [B, T] (and [B], [B, T + 1])
# arrays, with time on the last axis.
# --------------------------------------------------------------------------

def _rlax_returns(rewards, terminated, bootstrap):
    discount = GAMMA * (1.0 - terminated)
    # rlax bootstraps the last step with v_t[-1]; a scalar v_t per row is
    # broadcast over the sequence, so this is bootstrap_value.
    return jax.vmap(rlax.discounted_returns)(rewards, discount, bootstrap)


def _rlax_gae(rewards, terminated, values):
    discount = GAMMA * (1.0 - terminated)
    return jax.vmap(rlax.truncated_generalized_advantage_estimation,
                    in_axes=(0, 0, None, 0))(rewards, discount, LAMBDA,
                                             values)


def _rlax_lambda(rewards, terminated, values):
    discount = GAMMA * (1.0 - terminated)
    return jax.vmap(rlax.lambda_returns, in_axes=(0, 0, 0, None))(
        rewards, discount, values[:, 1:], LAMBDA)


def _afn_lambda(method):
    def fn(rewards, terminated, values):
        return afn.lambda_returns(rewards, values, gamma=GAMMA,
                                  lambda_=LAMBDA, terminated=terminated,
                                  method=method)
    return fn


def _afn_returns(method):
    def fn(rewards, terminated, bootstrap):
        return afn.discounted_returns(rewards, gamma=GAMMA,
                                      terminated=terminated,
                                      bootstrap_value=bootstrap,
                                      method=method)
    return fn


def _afn_gae(method):
    def fn(rewards, terminated, values):
        return afn.gae_advantages(rewards, values, gamma=GAMMA,
                                  lambda_=LAMBDA, terminated=terminated,
                                  method=method)
    return fn


def _reference_returns(rewards, terminated, bootstrap):
    r = np.asarray(rewards, np.float64)
    d = GAMMA * (1.0 - np.asarray(terminated, np.float64))
    out = np.empty_like(r)
    acc = np.asarray(bootstrap, np.float64)
    for t in range(r.shape[-1] - 1, -1, -1):
        acc = r[:, t] + d[:, t] * acc
        out[:, t] = acc
    return out


def _reference_lambda(rewards, terminated, values):
    r = np.asarray(rewards, np.float64)
    v = np.asarray(values, np.float64)
    d = GAMMA * (1.0 - np.asarray(terminated, np.float64))
    out = np.empty_like(r)
    acc = v[:, -1]
    for t in range(r.shape[-1] - 1, -1, -1):
        acc = r[:, t] + d[:, t] * ((1 - LAMBDA) * v[:, t + 1] + LAMBDA * acc)
        out[:, t] = acc
    return out


def _reference_gae(rewards, terminated, values):
    r = np.asarray(rewards, np.float64)
    v = np.asarray(values, np.float64)
    d = GAMMA * (1.0 - np.asarray(terminated, np.float64))
    delta = r + d * v[:, 1:] - v[:, :-1]
    out = np.empty_like(r)
    acc = np.zeros(r.shape[0])
    for t in range(r.shape[-1] - 1, -1, -1):
        acc = delta[:, t] + d[:, t] * LAMBDA * acc
        out[:, t] = acc
    return out


@dataclass
class Impl:
    name: str
    fn: Callable
    compile_ms: float = 0.0
    samples: list[float] = field(default_factory=list)

    @property
    def median_us(self) -> float:
        return float(np.median(self.samples)) * 1e6

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        q25, q50, q75 = np.percentile(self.samples, [25, 50, 75])
        return float((q75 - q25) / q50)


@dataclass
class Row:
    function: str
    shape: str
    method: str
    median_us: float
    ratio: float
    spread: float
    compile_ms: float


def _make_inputs(length, batch, seed):
    rng = np.random.default_rng(seed)
    rewards = rng.standard_normal((batch, length)).astype(np.float32)
    values = rng.standard_normal((batch, length + 1)).astype(np.float32)
    terminated = (rng.random((batch, length)) < TERMINATION_RATE)
    terminated = terminated.astype(np.float32)
    return rewards, values, terminated


def _check(name, got, want, what):
    want = np.asarray(want)
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(
        np.asarray(got, np.float64), np.asarray(want, np.float64),
        rtol=RTOL, atol=ATOL * scale,
        err_msg=f"{name} disagrees with {what}")


def _sample(fn, args, inner):
    start = time.perf_counter()
    for _ in range(inner):
        fn(*args).block_until_ready()
    return (time.perf_counter() - start) / inner


def _measure(impls, args, repeats, budget_s, sample_s):
    """Interleaved measurement of ``impls``; fills ``Impl.samples``."""
    # Calibrate the number of calls per sample on the baseline, and the
    # number of rounds on the total cost of one round.
    estimates = []
    for impl in impls:
        estimates.append(min(_sample(impl.fn, args, 1) for _ in range(3)))
    inner = max(1, int(round(sample_s / estimates[0])))
    round_s = inner * sum(estimates)
    rounds = int(min(repeats, max(min(repeats, 10), budget_s // round_s)))
    n = len(impls)
    for r in range(rounds):
        for k in range(n):
            impl = impls[(r + k) % n]
            impl.samples.append(_sample(impl.fn, args, inner))
    return rounds, inner


def _bench_function(label, baseline, reference, make_ours, methods, length,
                    batch, args, repeats, budget_s, sample_s):
    impls = [Impl("rlax", jax.jit(baseline))]
    impls += [Impl(m, jax.jit(make_ours(m))) for m in methods]

    outputs = {}
    for impl in impls:
        start = time.perf_counter()
        out = impl.fn(*args)
        out.block_until_ready()
        impl.compile_ms = (time.perf_counter() - start) * 1e3
        outputs[impl.name] = np.asarray(out)

    want = reference(*args)
    _check(f"{label} rlax", outputs["rlax"], want, "the float64 reference")
    for m in methods:
        _check(f"{label} method={m!r}", outputs[m], outputs["rlax"], "rlax")
        _check(f"{label} method={m!r}", outputs[m], want,
               "the float64 reference")

    rounds, inner = _measure(impls, args, repeats, budget_s, sample_s)
    base = impls[0].median_us
    shape = f"{length} x {batch}"
    rows = []
    for impl in impls:
        method = impl.name
        if method == "auto":
            method = f"auto={resolve_method('auto', length)}"
        rows.append(Row(label, shape, method, impl.median_us,
                        impl.median_us / base, impl.spread, impl.compile_ms))
    return rows, rounds, inner


def _print_table(rows):
    header = ("function", "T x B", "method", "median (us)", "vs rlax",
              "IQR/med", "compile (ms)", "target")
    lines = []
    for row in rows:
        target = ""
        if row.method.startswith("auto"):
            target = "ok" if row.ratio <= TARGET_RATIO else "MISSED"
        lines.append((row.function, row.shape, row.method,
                      f"{row.median_us:.1f}", f"{row.ratio:.2f}",
                      f"{100 * row.spread:.0f}%", f"{row.compile_ms:.0f}",
                      target))
    widths = [max(len(h), *(len(line[i]) for line in lines))
              for i, h in enumerate(header)]
    right = {3, 4, 5, 6}

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    previous = None
    for row, line in zip(rows, lines):
        key = (row.function, row.shape)
        if previous is not None and key != previous:
            print()
        previous = key
        print(fmt(line))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds per function and shape "
                             "(median over rounds; default 150, 30 with "
                             "--quick; fewer where a time budget caps it)")
    parser.add_argument("--quick", action="store_true",
                        help="time only rlax and method='auto', briefly")
    args = parser.parse_args(argv)

    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    repeats = args.repeats or (30 if args.quick else 150)
    methods = ("auto",) if args.quick else ("auto", "scan", "associative")
    budget_s = 0.8 if args.quick else 3.0  # measurement time per row group
    sample_s = 5e-4 if args.quick else 1e-3  # target length of one sample

    device = jax.devices()[0]
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"CPU: {cpu_model()}")
    print(f"jax {jax.__version__}, rlax {rlax.__version__}, "
          f"artifex_fn {afn.__version__}, numpy {np.__version__}, "
          f"python {platform.python_version()}")
    print(f"backend: {jax.default_backend()}, device: {device} "
          f"({device.device_kind}), host CPUs: {os.cpu_count()}")
    print(f"float32 inputs [B, T] (time last), gamma={GAMMA}, "
          f"lambda={LAMBDA}, terminated rate={TERMINATION_RATE}, "
          f"repeats={repeats}{' (quick)' if args.quick else ''}")
    print()

    started = time.perf_counter()
    rows, notes = [], []
    try:
        for seed, (length, batch) in enumerate(SHAPES):
            rewards, values, terminated = _make_inputs(length, batch, seed)
            rewards_j = jnp.asarray(rewards)
            values_j = jnp.asarray(values)
            terminated_j = jnp.asarray(terminated)
            bootstrap_j = jnp.asarray(values[:, -1])
            cases = (
                ("discounted_returns", _rlax_returns, _reference_returns,
                 _afn_returns, (rewards_j, terminated_j, bootstrap_j)),
                ("lambda_returns", _rlax_lambda, _reference_lambda,
                 _afn_lambda, (rewards_j, terminated_j, values_j)),
                ("gae_advantages", _rlax_gae, _reference_gae, _afn_gae,
                 (rewards_j, terminated_j, values_j)),
            )
            for label, baseline, reference, make_ours, fn_args in cases:
                new_rows, rounds, inner = _bench_function(
                    label, baseline, reference, make_ours, methods, length,
                    batch, fn_args, repeats, budget_s, sample_s)
                rows += new_rows
                notes.append(f"{label} {length} x {batch}: {rounds} rounds "
                             f"x {inner} calls")
    except AssertionError as err:
        print("NUMERIC CROSS-CHECK FAILED:", file=sys.stderr)
        print(err, file=sys.stderr)
        return 1

    _print_table(rows)
    print()
    print("samples: " + "; ".join(notes))
    auto = [row for row in rows if row.method.startswith("auto")]
    worst = max(auto, key=lambda row: row.ratio)
    met = "met" if worst.ratio <= TARGET_RATIO else "NOT met"
    print(f"auto vs rlax: max ratio {worst.ratio:.2f} "
          f"({worst.function}, {worst.shape}) "
          f"(target <= {TARGET_RATIO:.2f}: {met})")
    print(f"total time: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
