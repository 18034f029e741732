"""What the benchmark tables print about the machine (the library's own
helpers, re-exported for the scripts here)."""

from __future__ import annotations

from artifex_fn.experiments.outputs import cpu_model  # noqa: F401
from artifex_fn.experiments.outputs import made_on  # noqa: F401
