"""Session setup shared by the tests: fast compilation and a compilation
cache for this run.

Most of the suite's time is XLA compilation, and much of it compiles the
same program again: every trainer instance (and every ``jax.jit`` of a new
function object) traces and compiles its step anew, even when the program
is identical to one compiled a moment before. JAX's persistent compilation
cache, keyed on the program and compile options, turns those repeats into
a lookup. The cache lives in a fresh temporary directory private to this
process (each pytest-xdist worker has its own, so that no two processes
write one file at the same time) and is removed at the end; subprocesses
that the tests start (``test_checkpoint.py``) inherit it through the
environment. Executables from the cache are those XLA compiles for the same
program: nothing the tests check depends on whether it was used.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Most tests run tiny budgets, so XLA's compilation is most of their time,
# and most of that is LLVM optimising the generated code. The suite
# compiles with XLA's backend optimisation level 0 (set before JAX creates
# its CPU backend; subprocesses inherit it), which cuts compile times about
# 2.5x. It changes how fast the compiled code runs; what it computes agrees
# up to rounding (no fast-math at any level, but LLVM contracts some
# multiply-adds into FMAs only when optimising), so no test may depend on
# the last bits of a result. ``ARTIFEX_FN_TEST_XLA_OPT=default`` keeps
# XLA's default level, e.g. to check that nothing depends on it.
#
# The suite also turns off XLA's newer MLIR fusion emitters on CPU
# (``--xla_cpu_use_fusion_emitters=false``: fusions are emitted by the
# older LLVM IR emitters), which compile the same programs about 2x faster
# at level 0: 0.45 s instead of 1.1 s for a handful of initialisers and
# elementwise programs, 1.45 s instead of 2.3-2.8 s for a GRPOTrainer's
# first generating step (medians, this 2-core CPU). The same rounding
# caveat applies. ``ARTIFEX_FN_TEST_XLA_OPT=default`` keeps both defaults.
_FLAGS = {"--xla_backend_optimization_level": "0",
          "--xla_cpu_use_fusion_emitters": "false"}
if os.environ.get("ARTIFEX_FN_TEST_XLA_OPT", "0") != "default":
    _set = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = " ".join(
        [_set] + [f"{k}={v}" for k, v in _FLAGS.items()
                  if k not in _set]).strip()

import jax  # noqa: E402
from hypothesis import settings  # noqa: E402

# Under CI (``.ci/run`` sets CI) every property test draws the same
# examples on every run and machine, so a run is reproducible; locally the
# examples are random, which keeps looking for new counterexamples. Test
# modules build their settings on top of this profile (loaded before they
# are imported).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI", "").lower() not in ("", "0", "false"):
    settings.load_profile("ci")

_CACHE_DIR = tempfile.mkdtemp(prefix="artifex-fn-test-jax-cache-")
_CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": _CACHE_DIR,
    # Cache every program: the repeats are mostly small ones.
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
os.environ.update(_CACHE_ENV)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# Tokenizers and pre-trained models that tasks cache on disk
# (``artifex_fn.experiments.arith``) go to one directory per test session,
# created by the first process (pytest's, whose xdist workers inherit it)
# and removed by it: the tests never read a user's cache, and the workers
# share what one of them trained.
_OWN_TASK_CACHE = "ARTIFEX_FN_CACHE" not in os.environ
if _OWN_TASK_CACHE:
    os.environ["ARTIFEX_FN_CACHE"] = tempfile.mkdtemp(
        prefix="artifex-fn-test-task-cache-")


# The pre-training of the arith task is one long loop (600 steps for the
# small model), whose run time, not its compile time, dominates: it is
# compiled at XLA's full optimisation (about 9 s instead of 20 s).
from artifex_fn.experiments import arith  # noqa: E402

arith.PRETRAIN_COMPILER_OPTIONS = {"xla_backend_optimization_level": 3}


def _remove_cache():
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)
    if _OWN_TASK_CACHE:
        shutil.rmtree(os.environ["ARTIFEX_FN_CACHE"], ignore_errors=True)


atexit.register(_remove_cache)


def pytest_unconfigure(config):
    _remove_cache()
