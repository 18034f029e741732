"""Text in, text out for language models: tokenizers, chat prompts, decoding.

Everything here runs on the host (Python strings and NumPy arrays); the
compiled parts of a run see token ids only.

Tokenizer protocol
------------------
A tokenizer is any object with

* ``encode(text) -> list[int]``: the ids of ``text``; the strings of its
  special tokens inside ``text`` become their single ids;
* ``decode(ids, skip_special_tokens=True) -> str``: the text of ``ids``,
  without the special tokens when asked; never raises on ids that a model
  sampled (invalid UTF-8 and ids outside the vocabulary come out as
  ``"\\ufffd"``);
* ``vocab_size``, ``pad_token_id``, ``eos_token_id``, ``bos_token_id``
  (``None`` when there is none) and ``special_tokens`` (a tuple of
  strings).

Two implementations share one id layout: the ``k`` special tokens take ids
``0 .. k-1`` in their order (padding first), the rest of the vocabulary
follows. :class:`ByteTokenizer` maps each UTF-8 byte to one id and needs no
training; :class:`BPETokenizer` is a byte-level BPE (Sennrich et al. 2016,
"Neural Machine Translation of Rare Words with Subword Units") trained with
the Hugging Face ``tokenizers`` package, so that any text is encodable.
With the default :data:`SPECIAL_TOKENS` the first is the padding token,
``"<|bos|>"`` and ``"<|eos|>"`` are found by name (``"<|eos|>"`` must be
there), and the chat roles of :class:`ChatTemplate` are single tokens.

Prompts are left-padded (:func:`encode_prompts`, through
:func:`artifex_fn.sampling.pad_prompts`) as the sampler expects;
:func:`decode_completions` and :func:`decode_prompts` turn the sampler's
arrays back into strings for reward functions that read text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import pathlib
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from artifex_fn._src import checks
from artifex_fn._src.sampling import pad_prompts

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|end|>")
_BOS, _EOS, _END = "<|bos|>", "<|eos|>", "<|end|>"
_REPLACEMENT = "\ufffd"
_ROLES = ("system", "user", "assistant")


@runtime_checkable
class Tokenizer(Protocol):
    """What :func:`encode_prompts`, the decoders and text rewards need.

    See the module docstring for the contract of each member.
    """
    vocab_size: int
    pad_token_id: int
    eos_token_id: int
    bos_token_id: int | None
    special_tokens: tuple[str, ...]

    def encode(self, text: str) -> list[int]:
        ...

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ...


def _check_special_tokens(special_tokens) -> tuple[str, ...]:
    if isinstance(special_tokens, str):
        raise ValueError("`special_tokens` must be a sequence of strings, "
                         f"not one string: {special_tokens!r}.")
    tokens = tuple(special_tokens)
    if not all(isinstance(t, str) and t for t in tokens):
        raise ValueError("`special_tokens` must be non-empty strings, got "
                         f"{tokens!r}.")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"`special_tokens` has duplicates: {tokens!r}.")
    if _EOS not in tokens:
        raise ValueError(f"`special_tokens` must include {_EOS!r} (the end "
                         f"of a sequence), got {tokens!r}.")
    return tokens


def _id_list(ids) -> list[int]:
    arr = np.asarray(ids)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got {arr.dtype}.")
    if arr.ndim > 1:
        raise ValueError(f"`ids` must be one sequence, got shape {arr.shape}.")
    return [int(i) for i in arr.reshape(-1)]


def _decode_runs(ids, vocab_size: int, decode_run) -> str:
    """Decodes the runs of in-vocabulary ids; each other id is U+FFFD."""
    pieces = []
    for known, run in itertools.groupby(ids, lambda i: 0 <= i < vocab_size):
        run = list(run)
        pieces.append(decode_run(run) if known else _REPLACEMENT * len(run))
    return "".join(pieces)


class _SpecialIds:
    """The protocol's attributes derived from the special tokens (ids
    ``0 .. k-1``)."""

    _special: tuple[str, ...]

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The special tokens, in id order (id ``i`` is ``[i]``)."""
        return self._special

    @property
    def pad_token_id(self) -> int:
        """``0``: the first special token pads."""
        return 0

    @property
    def bos_token_id(self) -> int | None:
        """The id of ``"<|bos|>"``, or None without it."""
        return self._special.index(_BOS) if _BOS in self._special else None

    @property
    def eos_token_id(self) -> int:
        """The id of ``"<|eos|>"``."""
        return self._special.index(_EOS)


class ByteTokenizer(_SpecialIds):
    """Special tokens, then one id per UTF-8 byte: no training needed.

    Args:
      special_tokens: ids ``0 .. k-1``; byte ``b`` is id ``k + b`` and
        ``vocab_size = k + 256``.

    Examples:
      >>> tok = ByteTokenizer()
      >>> tok.encode("<|user|>hi")
      [4, 111, 112]
      >>> tok.decode([4, 111, 112]), tok.decode([4, 111, 112], False)
      ('hi', '<|user|>hi')
    """

    def __init__(self, special_tokens: Sequence[str] = SPECIAL_TOKENS):
        self._special = _check_special_tokens(special_tokens)
        self._ids = {t: i for i, t in enumerate(self._special)}
        longest_first = sorted(self._special, key=len, reverse=True)
        self._split = re.compile(
            "(" + "|".join(map(re.escape, longest_first)) + ")")

    @property
    def vocab_size(self) -> int:
        """``len(special_tokens) + 256``."""
        return len(self._special) + 256

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` (special-token strings become their ids).

        Raises ``ValueError`` for text that has no UTF-8 encoding (a lone
        surrogate such as ``"\\ud800"``)."""
        k, ids = len(self._special), []
        for i, piece in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self._ids[piece])
                continue
            try:
                data = piece.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(
                    f"`text` holds {e.object[e.start:e.end]!r} at {e.start}, "
                    "which UTF-8 cannot encode (a lone surrogate): not "
                    "valid Unicode text.") from None
            ids.extend(k + b for b in data)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; invalid UTF-8 is replaced, never raised."""
        k = len(self._special)

        def run(chunk):
            out = []
            for is_byte, part in itertools.groupby(chunk, lambda i: i >= k):
                if is_byte:
                    out.append(bytes(i - k for i in part).decode(
                        "utf-8", errors="replace"))
                elif not skip_special_tokens:
                    out.extend(self._special[i] for i in part)
            return "".join(out)

        return _decode_runs(_id_list(ids), self.vocab_size, run)

    def __eq__(self, other):
        return (type(other) is type(self)
                and other.special_tokens == self.special_tokens)

    def __hash__(self):
        return hash((type(self), self._special))

    def __repr__(self):
        return f"ByteTokenizer(special_tokens={self._special!r})"


class BPETokenizer(_SpecialIds):
    """Byte-level BPE of the Hugging Face ``tokenizers`` package.

    Build one with :meth:`train` or :meth:`load`; the constructor wraps a
    ``tokenizers.Tokenizer`` whose special tokens have ids ``0 .. k-1``.
    Text is split GPT-2 style and mapped to bytes before the merges, so any
    text is encodable and the special-token strings are single ids.

    Examples:
      >>> tok = BPETokenizer.train(["1 + 2 = 3", "2 + 2 = 4"] * 10,
      ...                          vocab_size=270)
      >>> ids = tok.encode("<|user|>2 + 3 = 5")
      >>> ids[0], tok.decode(ids)
      (4, '2 + 3 = 5')
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        added = tokenizer.get_added_tokens_decoder()
        special = [(i, t.content) for i, t in sorted(added.items())
                   if t.special]
        if [i for i, _ in special] != list(range(len(special))):
            raise ValueError("the special tokens must have ids 0 .. k-1, got "
                             f"{dict(special)}.")
        self._special = _check_special_tokens(t for _, t in special)
        self._tokenizer = tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int,
              special_tokens: Sequence[str] = SPECIAL_TOKENS,
              cache_path: str | os.PathLike | None = None) -> BPETokenizer:
        """Trains a tokenizer on ``texts`` (deterministic), or loads it.

        Args:
          texts: the training corpus, an iterable of strings.
          vocab_size: the largest vocabulary (special tokens and the 256
            byte symbols included); a small corpus may stop short of it.
          special_tokens: ids ``0 .. k-1``, in this order.
          cache_path: optional file. If it exists it is loaded instead of
            training (only its special tokens are checked against
            ``special_tokens``, not the corpus or size); else the trained
            tokenizer is saved there.

        Returns:
          The :class:`BPETokenizer`.
        """
        special = _check_special_tokens(special_tokens)
        checks.check_int(vocab_size, "vocab_size", lo=len(special) + 256)
        if cache_path is not None and pathlib.Path(cache_path).exists():
            cached = cls.load(cache_path)
            if cached.special_tokens != special:
                raise ValueError(
                    f"the tokenizer cached at {os.fspath(cache_path)!r} has "
                    f"special tokens {cached.special_tokens!r}, not "
                    f"{special!r}; remove the file or pass another path.")
            return cached
        if isinstance(texts, str):
            raise ValueError("`texts` must be an iterable of strings, not "
                             "one string.")
        corpus = list(texts)
        if not all(isinstance(t, str) for t in corpus):
            raise ValueError("`texts` must hold strings only.")
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(
            add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(special),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False)
        backend.train_from_iterator(corpus, trainer=trainer)
        out = cls(backend)
        if cache_path is not None:
            out.save(cache_path)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Reads a tokenizer written by :meth:`save` (a JSON file)."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {str(path)!r}.")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the package raises a bare Exception
            raise ValueError(f"cannot read a tokenizer from {str(path)!r}: "
                             f"{e}") from e
        return cls(backend)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the tokenizer to ``path`` atomically (a temporary file in
        the same folder, then ``os.replace``), creating the folders."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".",
                                   suffix=".tmp")
        os.close(fd)
        try:
            self._tokenizer.save(tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The number of ids, special tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` (special-token strings become their ids)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; invalid UTF-8 is replaced, never raised."""
        return _decode_runs(
            _id_list(ids), self.vocab_size,
            lambda run: self._tokenizer.decode(
                run, skip_special_tokens=skip_special_tokens))

    def __repr__(self):
        return (f"BPETokenizer(vocab_size={self.vocab_size}, "
                f"special_tokens={self._special!r})")


def _message(message, index: int) -> tuple[str, str]:
    if not isinstance(message, Mapping) or not {"role", "content"} <= set(
            message):
        raise ValueError(f"message {index} must be a dict with 'role' and "
                         f"'content', got {message!r}.")
    role, content = message["role"], message["content"]
    if role not in _ROLES:
        raise ValueError(f"message {index} has unknown role {role!r}; the "
                         f"roles are {_ROLES}.")
    if not isinstance(content, str):
        raise ValueError(f"message {index}: 'content' must be a string, got "
                         f"{type(content).__name__}.")
    return role, content


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """Chat messages to one prompt string: ``<role>content<end>`` each.

    Attributes:
      system, user, assistant: the marker written before a message of that
        role (by default the special tokens of the same names).
      end: the marker written after each message (a stop token of
        :func:`decode_completions` by default).

    Examples:
      >>> ChatTemplate().format([{"role": "system", "content": "Add."},
      ...                        {"role": "user", "content": "1+2"}])
      '<|system|>Add.<|end|><|user|>1+2<|end|><|assistant|>'
      >>> ChatTemplate().format("hi", add_generation_prompt=False)
      '<|user|>hi<|end|>'
    """
    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end: str = _END

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"`{field.name}` must be a non-empty string, "
                                 f"got {value!r}.")

    def format(self, messages, *, add_generation_prompt: bool = True) -> str:
        """The prompt string of ``messages``.

        Args:
          messages: dicts ``{"role": "system" | "user" | "assistant",
            "content": str}``, or a string (one user message).
          add_generation_prompt: end with the assistant marker, so that the
            model goes on with the answer.

        Returns:
          The formatted string.
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        parts = []
        for i, message in enumerate(messages):
            role, content = _message(message, i)
            parts += [getattr(self, role), content, self.end]
        if add_generation_prompt:
            parts.append(self.assistant)
        return "".join(parts)


def encode_prompts(tokenizer: Tokenizer, prompts, *,
                   template: ChatTemplate | None = None, bos: bool = False,
                   bucketing: str | int | None = "pow2"):
    """Prompts to left-padded token ids for :func:`artifex_fn.sampling.\
generate`.

    Args:
      tokenizer: a :class:`Tokenizer`.
      prompts: a list of strings, or (with ``template``) of message lists.
      template: optional :class:`ChatTemplate` formatting each prompt first
        (with the generation prompt).
      bos: put ``tokenizer.bos_token_id`` first.
      bucketing: the padded length, see
        :func:`artifex_fn.sampling.bucket_length`.

    Returns:
      ``(ids [B, L] int32, mask [B, L] float32)`` NumPy arrays, padded on
      the left with ``tokenizer.pad_token_id`` (``mask`` 0 there).

    Examples:
      >>> ids, mask = encode_prompts(ByteTokenizer(), ["ab", "c"])
      >>> ids.tolist(), mask.tolist()
      ([[104, 105], [0, 106]], [[1.0, 1.0], [0.0, 1.0]])
    """
    if not isinstance(prompts, (list, tuple)):
        raise ValueError("`prompts` must be a list of strings or of message "
                         f"lists, got {type(prompts).__name__}.")
    if not prompts:
        raise ValueError("`prompts` is empty.")
    if bos and tokenizer.bos_token_id is None:
        raise ValueError("`bos=True` needs a tokenizer with a bos_token_id.")
    rows = []
    for i, prompt in enumerate(prompts):
        if template is not None:
            prompt = template.format(prompt)
        elif not isinstance(prompt, str):
            raise ValueError(f"prompt {i} is not a string; pass "
                             "template=ChatTemplate() to format messages.")
        ids = ([tokenizer.bos_token_id] if bos else []) + list(
            tokenizer.encode(prompt))
        if not ids:
            raise ValueError(f"prompt {i} is empty (no tokens).")
        rows.append(ids)
    return pad_prompts(rows, pad_token_id=tokenizer.pad_token_id,
                       bucketing=bucketing)


def _rows(tokens, mask):
    """``tokens`` as a ``[B, N]`` integer array and ``mask > 0`` (None
    without a mask)."""
    arr = np.asarray(tokens)
    if arr.ndim != 2 or (arr.size and not np.issubdtype(arr.dtype,
                                                        np.integer)):
        raise ValueError("`tokens` must be [B, N] integer ids, got shape "
                         f"{arr.shape} and dtype {arr.dtype}.")
    if mask is None:
        return arr, None
    keep = np.asarray(mask)
    if keep.shape != arr.shape:
        raise ValueError(f"`mask` has shape {keep.shape}, `tokens` "
                         f"{arr.shape}.")
    return arr, keep > 0


def _stop_ids(tokenizer: Tokenizer, stop_token_ids) -> np.ndarray:
    if stop_token_ids is not None:
        stops = np.asarray(stop_token_ids).reshape(-1)
        return stops.astype(np.int64)
    stops = [tokenizer.eos_token_id]
    if _END in tokenizer.special_tokens:
        end = list(tokenizer.encode(_END))
        if len(end) == 1:
            stops += end
    return np.asarray(stops, np.int64)


def decode_completions(tokenizer: Tokenizer, tokens, mask=None, *,
                       stop_token_ids=None) -> list[str]:
    """The text of each row of sampled completions.

    Args:
      tokenizer: a :class:`Tokenizer`.
      tokens: ``[B, N]`` completion ids (any array-like).
      mask: optional ``[B, N]``; only tokens where it is non-zero are kept.
      stop_token_ids: ids ending a completion (the first one and all after
        it are dropped). Default: ``eos_token_id`` and the ``"<|end|>"``
        token if the tokenizer has it; ``()`` for none.

    Returns:
      ``B`` strings, special tokens skipped.

    Examples:
      >>> tok = ByteTokenizer()
      >>> decode_completions(tok, [[111, 112, 2, 113], [113, 6, 0, 0]])
      ['hi', 'j']
    """
    arr, keep = _rows(tokens, mask)
    stops = _stop_ids(tokenizer, stop_token_ids)
    out = []
    for b, row in enumerate(arr):
        if keep is not None:
            row = row[keep[b]]
        hits = np.flatnonzero(np.isin(row, stops))
        if hits.size:
            row = row[:hits[0]]
        out.append(tokenizer.decode(row.tolist(), skip_special_tokens=True))
    return out


def decode_prompts(tokenizer: Tokenizer, tokens, mask=None) -> list[str]:
    """The text of each row of left-padded prompts.

    Args:
      tokenizer: a :class:`Tokenizer`.
      tokens: ``[B, L]`` prompt ids.
      mask: optional ``[B, L]`` (0 on the padding); without it the leading
        ``tokenizer.pad_token_id`` s of each row are the padding.

    Returns:
      ``B`` strings, special tokens skipped.

    Examples:
      >>> tok = ByteTokenizer()
      >>> decode_prompts(tok, *encode_prompts(tok, ["hello", "hi"]))
      ['hello', 'hi']
    """
    arr, keep = _rows(tokens, mask)
    if keep is None:
        keep = np.cumsum(arr != tokenizer.pad_token_id, axis=1) > 0
    return [tokenizer.decode(row[k].tolist(), skip_special_tokens=True)
            for row, k in zip(arr, keep)]
