"""Toy data the library generates itself, for tests, examples and demos.

* :func:`gaussian_mixture_2d`: points from ``num_modes`` Gaussians on a
  circle, with :func:`mixture_coverage` to score samples against the modes.
* :func:`digits_8x8`: procedurally drawn 8x8 digit images (seven-segment
  glyphs, random one-pixel shifts and noise), values in ``[0, 1]``.
* :func:`digit_strings`: random token strings of digits for language-model
  tasks, with :func:`digit_sum` for a verifiable reward.

All functions are pure JAX (``jit``-able, deterministic in ``key``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ("mixture_means", "gaussian_mixture_2d", "mixture_coverage",
           "digits_8x8", "digit_strings", "digit_sum")


def mixture_means(num_modes: int = 8, radius: float = 2.0) -> jax.Array:
    """Means ``[num_modes, 2]`` equally spaced on a circle."""
    angles = 2 * jnp.pi * jnp.arange(num_modes) / num_modes
    return radius * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def gaussian_mixture_2d(key, n: int, *, num_modes: int = 8,
                        radius: float = 2.0, std: float = 0.1) -> jax.Array:
    """``n`` points ``[n, 2]`` from an equal-weight ring of Gaussians.

    >>> x = gaussian_mixture_2d(jax.random.key(0), 4)
    >>> x.shape
    (4, 2)
    """
    k1, k2 = jax.random.split(key)
    modes = jax.random.randint(k1, (n,), 0, num_modes)
    means = mixture_means(num_modes, radius)[modes]
    return means + std * jax.random.normal(k2, (n, 2))


def mixture_coverage(samples, *, num_modes: int = 8, radius: float = 2.0,
                     std: float = 0.1, threshold: float = 3.0):
    """How well ``samples [n, 2]`` cover the mixture's modes.

    Returns a dict of scalars: ``modes_covered`` (number of modes with at
    least one sample within ``threshold * std`` of the mean), ``coverage``
    (that number over ``num_modes``), ``high_quality`` (fraction of samples
    within ``threshold * std`` of some mode) and ``mode_entropy`` (entropy
    of the nearest-mode histogram, ``log(num_modes)`` when balanced).
    """
    means = mixture_means(num_modes, radius)
    d = jnp.linalg.norm(samples[:, None, :] - means[None], axis=-1)
    nearest = jnp.argmin(d, axis=1)
    close = jnp.min(d, axis=1) < threshold * std
    counts = jnp.sum(jax.nn.one_hot(nearest, num_modes) * close[:, None],
                     axis=0)
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)),
                                 0.0))
    covered = jnp.sum(counts > 0)
    return dict(modes_covered=covered, coverage=covered / num_modes,
                high_quality=jnp.mean(close.astype(jnp.float32)),
                mode_entropy=entropy)


# Seven-segment glyphs: segments a (top), b (top right), c (bottom right),
# d (bottom), e (bottom left), f (top left), g (middle).
_SEGMENTS = {
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg",
    5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}


def _glyphs() -> np.ndarray:
    """``[10, 8, 8]`` float32 digit templates drawn inside a 6x4 box."""
    out = np.zeros((10, 8, 8), np.float32)
    top, mid, bot, left, right = 1, 4, 7, 2, 5
    strokes = {
        "a": (slice(top, top + 1), slice(left, right + 1)),
        "g": (slice(mid, mid + 1), slice(left, right + 1)),
        "d": (slice(bot - 1, bot), slice(left, right + 1)),
        "f": (slice(top, mid + 1), slice(left, left + 1)),
        "b": (slice(top, mid + 1), slice(right, right + 1)),
        "e": (slice(mid, bot), slice(left, left + 1)),
        "c": (slice(mid, bot), slice(right, right + 1)),
    }
    for digit, segs in _SEGMENTS.items():
        for s in segs:
            out[(digit,) + strokes[s]] = 1.0
    return out


_GLYPHS = _glyphs()


def digits_8x8(key, n: int, *, noise: float = 0.05, shift: bool = True):
    """``n`` procedurally drawn digit images and their labels.

    Returns ``(images [n, 8, 8] in [0, 1], labels [n] int32)``. Each image is
    a seven-segment glyph, shifted by at most one pixel horizontally when
    ``shift``, plus clipped Gaussian pixel noise.

    >>> images, labels = digits_8x8(jax.random.key(0), 3)
    >>> images.shape, labels.shape
    ((3, 8, 8), (3,))
    """
    k1, k2, k3 = jax.random.split(key, 3)
    labels = jax.random.randint(k1, (n,), 0, 10)
    images = jnp.asarray(_GLYPHS)[labels]
    if shift:
        offsets = jax.random.randint(k2, (n,), -1, 2)
        images = jax.vmap(lambda im, o: jnp.roll(im, o, axis=1))(images,
                                                                 offsets)
    images = jnp.clip(images + noise * jax.random.normal(k3, images.shape),
                      0.0, 1.0)
    return images, labels.astype(jnp.int32)


def digit_strings(key, n: int, length: int, *, first_digit_token: int = 2):
    """Random strings of ``length`` digit tokens ``[n, length]`` int32.

    Digit ``d`` is token ``first_digit_token + d``, leaving tokens
    ``0 .. first_digit_token - 1`` for padding / BOS / EOS.
    """
    digits = jax.random.randint(key, (n, length), 0, 10)
    return (digits + first_digit_token).astype(jnp.int32)


def digit_sum(tokens, mask=None, *, first_digit_token: int = 2):
    """Sum of the digits in token strings ``[n, L]`` (non-digits count 0)."""
    d = tokens - first_digit_token
    valid = (d >= 0) & (d <= 9)
    if mask is not None:
        valid = valid & (jnp.asarray(mask) > 0)
    return jnp.sum(jnp.where(valid, d, 0), axis=-1)
