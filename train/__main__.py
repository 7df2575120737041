"""python -m train --config=configs/<file>.py:<arg> --workdir=<dir> [--config.key=value ...]

Multi-host: add --distributed=auto (SLURM, TPU pods) or --distributed=explicit
--coordinator_address=host:port --num_processes=N --process_id=i.
"""

from train import tf_setup  # First: TensorFlow loads without its C++ start-up lines.

# isort: split

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from train import checkpoint
from train import command
from train import distributed
from train import preemption
from train import startup
from train import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/fashion_mnist.py:stage=pretrain.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, exports).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  tf_setup.hide_gpus_from_tensorflow()
  startup.init()
  distributed.initialize()
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except preemption.Preempted as e:
    print(f"[train] {e}", file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_CODE)
  except checkpoint.WriteError as e:
    sys.exit(f"FATAL {e}")


if __name__ == "__main__":
  command.run(main)
