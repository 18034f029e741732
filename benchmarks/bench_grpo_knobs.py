"""Benchmark: GRPO's practical knobs on the arith text task.

Runs the ``arith`` task's GRPO program (:mod:`artifex_fn.experiments.arith`:
a small causal LM pre-trained to answer "What is seven plus two?" right a
fifth of the time, fine-tuned on the exact-answer reward read from the
decoded text) under four settings, each with the task's hyper-parameters:

* **baseline**: one update per generation (``num_epochs=1``);
* **mu=2**: two updates per generation (``num_epochs=2``), ratios against
  the generation's log-probs; **mu=2, half**: the same for half the
  iterations (half the generated answers);
* **dynamic**: dynamic sampling: 32 groups generated, the first 16 whose
  rewards differ trained on (fill rate reported);
* **lora**: rank-8 LoRA adapters on every linear layer of the frozen
  pre-trained model, which is the reference (adapters zeroed), Adam on the
  adapters only.

For each: exact-answer success of the sampled answers against generated
samples (the curve, ``rewards/exact/mean`` over every generated answer,
smoothed over 20 iterations), the samples needed to first reach a smoothed
success of 0.9, the held-out evaluation before and after (one sampled
answer per question, twice), the wall time, and for LoRA the bytes of the
trained parameters plus Adam's state against full fine-tuning's.

Usage::

    python benchmarks/bench_grpo_knobs.py [--seeds N] [--out DIR]

writes ``DIR/grpo_knobs.png`` (default ``benchmarks/results``) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _machine import made_on  # noqa: E402

SETTINGS = {
    "baseline": dict(),
    "mu=2": dict(num_epochs=2),
    "mu=2, half": dict(num_epochs=2, iterations=300),
    "dynamic": dict(keep_groups=16),
    "lora": dict(lora_rank=8),
}


def smooth(x, k=20):
    x = np.asarray(x, np.float64)
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = np.empty_like(x)
    for i in range(len(x)):
        lo = max(0, i - k + 1)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def memory(settings):
    """Bytes of (trained parameters, Adam state) for full and LoRA."""
    import jax
    import optax

    from artifex_fn.experiments import arith
    from artifex_fn.lora import tree_bytes

    s = dict(arith.MODEL_SETTINGS)
    full, _ = arith.pretrained(s)
    _, adapters = arith.lora_model(s, settings["lora_rank"])
    out = {}
    for name, params in (("full", full), ("lora", adapters)):
        opt = jax.eval_shape(optax.adam(1e-3).init, params)
        out[name] = (tree_bytes(params), sum(
            int(np.prod(x.shape)) * x.dtype.itemsize
            for x in jax.tree_util.tree_leaves(opt)))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()

    from artifex_fn.experiments import arith
    from artifex_fn.experiments import runner

    arith.pretrained(dict(arith.MODEL_SETTINGS))   # cached before timing
    rows, curves = [], {}
    for name, over in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        program = arith.grpo_program(over)
        t0 = time.perf_counter()
        result = runner.run(program, hparams=arith.HPARAMS["grpo"],
                            num_seeds=args.seeds, chunks=10, progress=False)
        seconds = time.perf_counter() - t0
        exact = np.asarray(result.metrics["rewards/exact/mean"])
        exact = exact.reshape(-1, exact.shape[-1])      # [seeds, iterations]
        per_iter = program.samples_per_iteration
        reach = []
        for seed_curve in exact:
            sm = smooth(seed_curve)
            hit = np.nonzero(sm >= 0.9)[0]
            reach.append(float((hit[0] + 1) * per_iter) if hit.size
                         else np.nan)
        curves[name] = (np.arange(1, exact.shape[1] + 1) * per_iter,
                        smooth(exact.mean(0)))
        before = np.ravel(result.before["success"]).mean()
        after = np.ravel(result.after["success"])
        fill = result.metrics.get("dynamic_sampling/fill_rate")
        rows.append(dict(
            name=name, before=before, after=after, reach=reach,
            seconds=seconds,
            fill=None if fill is None else np.asarray(fill).reshape(
                -1, exact.shape[1])))
        print(f"{name}: success {before:.3f} -> "
              f"{' / '.join(f'{a:.3f}' for a in after)}, samples to 0.9: "
              f"{reach}, {seconds:.0f} s", flush=True)

    print(f"\n{made_on()}\n")
    print("| setting | success before -> after (per seed) | generated "
          "samples to smoothed success 0.9 | wall time |")
    print("|---|---|---|---|")
    for r in rows:
        reach = " / ".join("never" if np.isnan(x) else f"{int(x):,}"
                           for x in r["reach"])
        print(f"| {r['name']} | {r['before']:.3f} -> "
              f"{' / '.join(f'{a:.3f}' for a in r['after'])} | {reach} | "
              f"{r['seconds']:.0f} s |")
    for r in rows:
        if r["fill"] is not None:
            f = r["fill"].mean(0)
            q = len(f) // 4
            print(f"\ndynamic sampling fill rate (mean per quarter of "
                  f"training): " + ", ".join(
                      f"{f[i * q:(i + 1) * q].mean():.2f}" for i in range(4)))
    if not args.only or "lora" in args.only:
        mem = memory(SETTINGS["lora"])
        (fp, fo), (lp, lo) = mem["full"], mem["lora"]
        print(f"\nmemory of trained parameters + Adam state: full "
              f"{fp:,} + {fo:,} = {fp + fo:,} bytes; LoRA rank 8 "
              f"{lp:,} + {lo:,} = {lp + lo:,} bytes "
              f"({(lp + lo) / (fp + fo):.2f}x); the LoRA reference holds no "
              f"copy (a full reference: {fp:,} more bytes)")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name)
    ax.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("generated answers")
    ax.set_ylabel("exact-answer success (smoothed)")
    ax.set_title("GRPO on arith: knobs", fontsize=10)
    ax.text(0.99, 0.01, made_on(), transform=ax.transAxes, fontsize=6,
            ha="right", va="bottom", color="grey")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(args.out, "grpo_knobs.png")
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
