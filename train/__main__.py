"""python -m train --config=configs/<file>.py:<arg> --workdir=<dir> [--config.key=value ...]"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF only preprocesses on the host.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from ml_collections import config_flags
import tensorflow as tf

from train import run_log
from train import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/fashion_mnist.py:stage=pretrain.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, exports).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  tf.config.set_visible_devices([], "GPU")  # Keep accelerators for JAX.
  run_log.quiet_library_logs()
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
