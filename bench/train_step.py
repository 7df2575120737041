"""The trainer's own jitted step on one fixed batch, for benchmarks that time training.

Flag-free, so that any benchmark can import it (absl flags are global).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from train import optimizer
from train import sharding
from train import trainer
from train import vit


class TrainStep:
  """`train.trainer.jit_train_step` for `config` on a fixed random batch of `image_shape`.

  `time(n)` runs n steps and returns their seconds; `compile_s` and
  `xla_flops` (XLA's cost analysis of the step) are measured once, here.
  """

  def __init__(self, config, image_shape):
    model = vit.build_model(config.model, config.num_classes)
    tx, _ = optimizer.make_optimizer(config)
    mesh = sharding.make_mesh(config.mesh)
    init = lambda rng: trainer.state_from_params(  # pylint: disable=g-long-lambda
        model.init(rng, jnp.zeros((1, *image_shape)))["params"], tx)
    state_shardings = sharding.tree_shardings(mesh, jax.eval_shape(init, jax.random.key(0)),
                                              config.param_sharding)
    self._state = jax.jit(init, out_shardings=state_shardings)(jax.random.key(config.seed))
    rng = np.random.default_rng(0)
    n = config.batch_size
    self._batch = sharding.to_global({
        "image": rng.uniform(-1, 1, (n, *image_shape)).astype(np.float32),
        "labels": np.eye(config.num_classes, dtype=np.float32)[
            rng.integers(0, config.num_classes, n)]}, sharding.batch_sharding(mesh))
    start = time.perf_counter()
    self._step = trainer.jit_train_step(config, model, tx, mesh, state_shardings).lower(
        self._state, self._batch, jnp.int32(0)).compile()
    self.compile_s = time.perf_counter() - start
    self.xla_flops = self._step.cost_analysis()["flops"]
    self._count = 0
    self.time(2)  # Warm-up.

  def time(self, steps):
    start = time.perf_counter()
    for _ in range(steps):
      self._state, metrics = self._step(self._state, self._batch, jnp.int32(self._count))
      self._count += 1
    jax.block_until_ready(metrics)
    return time.perf_counter() - start
