"""Helpers for the evaluator tests (test_eval.py, test_eval_report.py): a run config read
back as `python -m eval` reads it, random weights, and logits computed the direct way."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from configs import fashion_mnist
from eval import evaluators as eval_lib
from eval import run_config
from eval import shifts
from train import preprocess
from train import sharding
from train import vit


def stored_run_config(tmp_path, **overrides):
  """A mu/4 Fashion-MNIST run's config, read back from config.json as `python -m eval` does."""
  config = fashion_mnist.get_config("variant=mu/4")
  config.update_from_flattened_dict(overrides)
  path = tmp_path / "config.json"
  path.write_text(config.to_json())
  return run_config.load(str(path))


def random_params(model, image_shape, seed):
  """Random weights with a random head (the model's head starts at zero: constant logits)."""
  params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, *image_shape)))["params"]
  kernel = jax.random.normal(jax.random.key(seed + 1), params["head"]["kernel"].shape)
  return {**params, "head": {"kernel": kernel, "bias": params["head"]["bias"]}}


def eval_setup(config, image_shape=(28, 28, 1), batch_size=0, seeds=(0,)):
  """(model, its `Evaluators` on every device, random weights for each of `seeds`)."""
  model = vit.build_model(config.model, config.num_classes)
  mesh = sharding.make_mesh((("data", -1),))
  evaluators = eval_lib.Evaluators(config, model, mesh, sharding.replicated(mesh), batch_size)
  return model, evaluators, [random_params(model, image_shape, seed) for seed in seeds]


@functools.cache
def _jitted_apply(model):
  return jax.jit(lambda params, images: model.apply({"params": params}, images))


def direct_logits(model, params, dataset):
  """Logits and labels of every example, preprocessed one by one and run as one batch."""
  fn = preprocess.build(dataset.pp, shifts.OPS)
  images, labels = dataset.split.read(np.arange(len(dataset.split)))
  examples = [fn({"image": tf.constant(image), "label": tf.constant(label)},
                 tf.constant([0, position], tf.int64))  # The evaluation seed: (0, position).
              for position, (image, label) in enumerate(zip(images, labels))]
  batch = np.stack([e["image"].numpy() for e in examples])
  return np.asarray(_jitted_apply(model)(params, batch)), labels


def top1(logits, labels, class_subset=None):
  if class_subset is None:
    return float(np.mean(np.argmax(logits, -1) == labels))
  return float(np.mean(class_subset[np.argmax(logits[:, class_subset], -1)] == labels))
