"""python -m train --config=configs/<file>.py:<arg> --workdir=<dir> [--config.key=value ...]

Multi-host: add --distributed=auto (SLURM, TPU pods) or --distributed=explicit
--coordinator_address=host:port --num_processes=N --process_id=i.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF only preprocesses on the host.

import re  # pylint: disable=g-import-not-at-top,g-bad-import-order
import sys  # pylint: disable=g-import-not-at-top,g-bad-import-order

from absl import app
from absl import flags
from ml_collections import config_flags

from train import checkpoint
from train import distributed
from train import preemption
from train import startup
from train import tf_setup
from train import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/fashion_mnist.py:stage=pretrain.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, exports).")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl's flag parsing, with a one-line error for an override of a key that does not exist."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: the locked config has no such key.
    message = str(e)
    key = re.search(r"'(\w+)", message)
    suggestion = re.search(r'Did you mean "(\w+)"', message)
    key = key.group(1) if key else message
    culprit = [a.split("=")[0] for a in argv
               if a.startswith("--config.") and key in a.split("=")[0]]
    sys.exit(f"FATAL Flags parsing error: {culprit[0] if culprit else key}: the config has no "
             f"key {key!r}" + (f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""))


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
  app.run(main, flags_parser=parse_flags)
