"""Text in, text out for language-model fine-tuning (on the host).

* :class:`Tokenizer`: the protocol (``encode``, ``decode``, ``vocab_size``,
  ``pad_token_id``, ``eos_token_id``, ``bos_token_id``,
  ``special_tokens``) that any user tokenizer may satisfy;
* :class:`ByteTokenizer`: special tokens, then one id per UTF-8 byte;
* :class:`BPETokenizer`: a byte-level BPE trained (deterministically, with
  an optional file cache) by the Hugging Face ``tokenizers`` package;
* :data:`SPECIAL_TOKENS`: the default special tokens, padding first (id 0);
* :class:`ChatTemplate`: chat messages to one prompt string;
* :func:`encode_prompts`: strings or chats to left-padded ``[B, L]`` ids
  and mask, as :func:`artifex_fn.sampling.generate` takes them;
* :func:`decode_completions` / :func:`decode_prompts`: sampled arrays back
  to strings, cut at the stop tokens.

Reward functions that read the decoded text are
:class:`artifex_fn.training.TextReward` and its built-ins. See
:mod:`artifex_fn._src.text` for the conventions.
"""

from artifex_fn._src.text import SPECIAL_TOKENS
from artifex_fn._src.text import BPETokenizer
from artifex_fn._src.text import ByteTokenizer
from artifex_fn._src.text import ChatTemplate
from artifex_fn._src.text import Tokenizer
from artifex_fn._src.text import decode_completions
from artifex_fn._src.text import decode_prompts
from artifex_fn._src.text import encode_prompts

__all__ = ("SPECIAL_TOKENS", "BPETokenizer", "ByteTokenizer", "ChatTemplate",
           "Tokenizer", "decode_completions", "decode_prompts",
           "encode_prompts")
