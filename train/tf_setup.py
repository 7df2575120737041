"""TensorFlow only reads and preprocesses data on the host: every command keeps it off the GPUs."""

import tensorflow as tf


def hide_gpus_from_tensorflow():
  """Leaves the accelerators to JAX; call first in a command's main, before TF runs any op."""
  tf.config.set_visible_devices([], "GPU")
