"""Masking / survival schedules alpha(t) on [0, 1] (docs/methods.md §1).

alpha(t) is the probability that a token is still clean at time t; it decreases from about 1 at
t = 0 to about 0 at t = 1. Every schedule exposes alpha(t), 1 - alpha(t) and the derivative
dalpha(t), elementwise on arrays, each in its own closed form: 1 - alpha is never computed by
subtraction (in float32 that loses ~4e-4 relative accuracy near t = 0 for the geometric
schedule), and every value is finite on all of [0, 1], endpoints included.
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
# poly<k> with k < 1 has an infinite derivative at t = 0; it is evaluated at max(t, T_FLOOR).
# Antithetic float32 times are multiples of 2^-23, so this only changes the value at t = 0.
T_FLOOR = 2.0**-24

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A survival schedule: alpha(t), one_minus_alpha(t) and the time derivative dalpha(t)."""

  name: str
  alpha: Callable[[Array], Array]
  one_minus_alpha: Callable[[Array], Array]
  dalpha: Callable[[Array], Array]

  def weight(self, t: Array) -> Array:
    """Continuous-time NELBO weight alpha'(t) / (1 - alpha(t)) (negative)."""
    return self.dalpha(t) / self.one_minus_alpha(t)


def _clamped(name: str, a: Callable[[Array], Array], one_minus_a: Callable[[Array], Array],
             da: Callable[[Array], Array], eps: float) -> Schedule:
  """alpha(t) = eps + (1 - 2 eps) a(t), so that alpha stays inside (0, 1).

  1 - alpha(t) = eps + (1 - 2 eps) (1 - a(t)), with 1 - a(t) given in closed form.
  """
  scale = 1.0 - 2.0 * eps
  return Schedule(name, lambda t: eps + scale * a(t), lambda t: eps + scale * one_minus_a(t),
                  lambda t: scale * da(t))


def linear(eps: float = EPS) -> Schedule:
  return _clamped("linear", lambda t: 1.0 - t, lambda t: t, lambda t: -jnp.ones_like(t), eps)


def cosine(eps: float = EPS) -> Schedule:
  """a(t) = 1 - cos(pi/2 (1 - t)) = 2 sin^2(pi/4 (1 - t)); 1 - a(t) = sin(pi/2 t)."""
  half_pi = math.pi / 2
  return _clamped("cosine", lambda t: 2.0 * jnp.sin(0.5 * half_pi * (1.0 - t))**2,
                  lambda t: jnp.sin(half_pi * t),
                  lambda t: -half_pi * jnp.sin(half_pi * (1.0 - t)), eps)


def poly(k: float, eps: float = EPS) -> Schedule:
  """a(t) = 1 - t^k = -expm1(k log t); 1 - a(t) = t^k."""
  def derivative(t: Array) -> Array:
    return -k * (jnp.maximum(t, T_FLOOR) if k < 1 else t) ** (k - 1.0)

  return _clamped(f"poly{k:g}", lambda t: -jnp.expm1(k * jnp.log(t)), lambda t: t**k,
                  derivative, eps)


def geometric(sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> Schedule:
  """alpha(t) = exp(-sigma_min^(1-t) sigma_max^t); no extra clamp."""
  log_ratio = math.log(sigma_max / sigma_min)

  def sigma(t: Array) -> Array:
    return sigma_min * jnp.exp(log_ratio * t)

  return Schedule("geometric", lambda t: jnp.exp(-sigma(t)), lambda t: -jnp.expm1(-sigma(t)),
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
