"""Exponential moving averages of the weights, kept beside them every step.

The model-soups recipe keeps a low (decay 0.999) and a high (decay 0.9999999)
EMA of every run; soups are usually cooked from the low one.
"""

import jax
import jax.numpy as jnp

from train import errors

EMA_NAMES = ("ema_low", "ema_high")


def decays(ema_config):
  """{'ema_low': decay, 'ema_high': decay} from `config.ema`."""
  out = {"ema_low": ema_config.low, "ema_high": ema_config.high}
  for name, decay in out.items():
    if not 0.0 <= decay < 1.0:
      raise errors.UserError(f"config.ema.{name[4:]}={decay}: an EMA decay must be in [0, 1)")
  return out


def update(ema, params, decay):
  """ema + (1 - decay) * (params - ema).

  Written in this form rather than `decay * ema + (1 - decay) * params`: in
  float32, 0.9999999 rounds to 0.99999988, while 1 - 0.9999999 = 1e-7 is kept
  to 7 digits, so the high EMA moves at the rate the config asks for.
  """
  step = 1.0 - decay
  return jax.tree.map(lambda e, p: e + step * (p.astype(e.dtype) - e), ema, params)


def init(params):
  """An EMA starting at `params`, kept in float32 whatever their dtype: at decay 0.9999999
  a bfloat16 average (8 bits of mantissa) would never move."""
  return jax.tree.map(lambda p: p.astype(jnp.float32), params)
