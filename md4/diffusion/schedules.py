"""Masking / survival schedules alpha(t) on [0, 1] (docs/methods.md §1).

alpha(t) is the probability that a token is still clean at time t; it decreases from about 1 at
t = 0 to about 0 at t = 1. Every schedule exposes alpha(t) and its derivative dalpha(t), both
elementwise on arrays, written in closed form so that they are exact under jit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import jax.numpy as jnp

EPS = 1e-4
SIGMA_MIN = 1e-4
SIGMA_MAX = 20.0

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A survival schedule: alpha(t) and its time derivative dalpha(t)."""

  name: str
  alpha: Callable[[Array], Array]
  dalpha: Callable[[Array], Array]

  def weight(self, t: Array) -> Array:
    """Continuous-time NELBO weight alpha'(t) / (1 - alpha(t)) (negative)."""
    return self.dalpha(t) / (1.0 - self.alpha(t))


def _clamped(name: str, a: Callable[[Array], Array], da: Callable[[Array], Array],
             eps: float) -> Schedule:
  """alpha(t) = eps + (1 - 2 eps) a(t), so that alpha stays inside (0, 1)."""
  scale = 1.0 - 2.0 * eps
  return Schedule(name, lambda t: eps + scale * a(t), lambda t: scale * da(t))


def linear(eps: float = EPS) -> Schedule:
  return _clamped("linear", lambda t: 1.0 - t, lambda t: -jnp.ones_like(t), eps)


def cosine(eps: float = EPS) -> Schedule:
  half_pi = math.pi / 2
  return _clamped("cosine", lambda t: 1.0 - jnp.cos(half_pi * (1.0 - t)),
                  lambda t: -half_pi * jnp.sin(half_pi * (1.0 - t)), eps)


def poly(k: float, eps: float = EPS) -> Schedule:
  return _clamped(f"poly{k:g}", lambda t: 1.0 - t**k, lambda t: -k * t ** (k - 1.0), eps)


def geometric(sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> Schedule:
  """alpha(t) = exp(-sigma_min^(1-t) sigma_max^t); no extra clamp."""
  log_ratio = math.log(sigma_max / sigma_min)

  def sigma(t: Array) -> Array:
    return sigma_min * jnp.exp(log_ratio * t)

  return Schedule("geometric", lambda t: jnp.exp(-sigma(t)),
                  lambda t: -jnp.exp(-sigma(t)) * sigma(t) * log_ratio)


KNOWN = ("linear", "cosine", "poly<k> (e.g. poly2, poly0.5)", "geometric")


def get_schedule(name: str, **kw) -> Schedule:
  """Returns the schedule called `name`; keyword arguments go to its constructor (e.g. eps)."""
  if name == "linear":
    return linear(**kw)
  if name == "cosine":
    return cosine(**kw)
  if name == "geometric":
    return geometric(**kw)
  match = re.fullmatch(r"poly(\d+(?:\.\d+)?)", name)
  if match:
    return poly(float(match.group(1)), **kw)
  raise ValueError(f"unknown schedule {name!r}; known: {', '.join(KNOWN)}")
