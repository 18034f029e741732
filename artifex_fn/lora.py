"""LoRA adapters for NNX models and the memory they save.

See :mod:`artifex_fn._src.lora`.
"""

from artifex_fn._src.lora import add_lora
from artifex_fn._src.lora import optimizer_bytes
from artifex_fn._src.lora import parameter_bytes
from artifex_fn._src.lora import tree_bytes

__all__ = ("add_lora", "optimizer_bytes", "parameter_bytes", "tree_bytes")
