"""The trainer's own jitted step on one fixed batch, for benchmarks that time training.

Flag-free, so that any benchmark can import it (absl flags are global).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import fashion_mnist
from train import optimizer
from train import sharding
from train import trainer
from train import vit

# The benchmarked ViTs: variant -> input, classes, batch, and `steps` per timed round
# (a round of about a second or more).
MODELS = {
    "pico/7": dict(image_size=28, channels=1, num_classes=10, batch_size=128, steps=50),
    "S/16": dict(image_size=224, channels=3, num_classes=1000, batch_size=16, steps=2),
    "B/16": dict(image_size=224, channels=3, num_classes=1000, batch_size=8, steps=1),
}


def benchmark_config(variant, spec):
  """configs/fashion_mnist.py's fine-tuning config with the benchmark's model, classes and batch."""
  config = fashion_mnist.get_config(f"variant={variant}")
  config.num_classes = spec["num_classes"]
  config.batch_size = spec["batch_size"]
  if config.optimizer.name != "sgd" or config.optimizer.weight_decay or config.label_smoothing:
    raise ValueError("the timm peer mirrors SGD without weight decay or label smoothing; "
                     f"configs/fashion_mnist.py now asks for {config.optimizer.name}")
  return config


class TrainStep:
  """`train.trainer.jit_train_step` for `config` on a fixed random batch of `image_shape`.

  `time(n)` runs n steps and returns their seconds; `compile_s`, `xla_flops`
  (XLA's cost analysis of the step) and `hlo_text` (the compiled module) are
  taken once, here.
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
    self.hlo_text = self._step.as_text()
    self._count = 0
    self.time(2)  # Warm-up.

  def time(self, steps):
    start = time.perf_counter()
    for _ in range(steps):
      self._state, metrics = self._step(self._state, self._batch, jnp.int32(self._count))
      self._count += 1
    jax.block_until_ready(metrics)
    return time.perf_counter() - start
