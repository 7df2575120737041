"""The training loop: fine-tune a ViT, keep two EMAs, checkpoint, resume, export.

`train_and_evaluate(config, workdir)` leaves in `workdir` (train/run_dir.py):
  config.json        the resolved config
  init.json          the model_init file started from, with its SHA-256
  checkpoints/<step> orbax: params, ema_low, ema_high, opt_state
  metrics.jsonl      training metrics (and tensorboard/)
  final/<name>.npz   every weight set in big_vision's layout (SSF folded in)
  results.json       held-out and test accuracy of every weight set

Re-running the same command resumes from the last checkpoint and ends with
weights bit-identical to an uninterrupted run: the data order, augmentations
and dropout are functions of (seed, step).
"""

import json
import os
import re

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax

from train import accuracy
from train import checkpoint
from train import data
from train import ema
from train import errors
from train import losses
from train import mixing
from train import optimizer
from train import pp_spec
from train import preemption
from train import preprocess
from train import pretrained
from train import run_dir
from train import run_log
from train import sharding
from train import trainable as trainable_lib
from train import trees
from train import vit

FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def _check_config(config, builder):
  """Cross-key checks that ConfigDict's types cannot express."""
  num_labels = builder.info.features["label"].num_classes
  expected = len(config.input.classes) or num_labels
  if config.num_classes != expected:
    raise errors.UserError(
        f"config.num_classes={config.num_classes} but the data has {expected} classes "
        f"({builder.name}" + (f", config.input.classes={config.input.classes})"
                              if config.input.classes else ")"))
  for key in ("pp_train", "pp_eval"):
    spec = pp_spec.resolve(config, key)
    try:
      preprocess.parse(spec)
    except ValueError as e:
      raise errors.UserError(f"config.input.{key}: {e}") from e
  pp_spec.check_knobs_used(config)
  if not 0 <= config.label_smoothing < 1:
    raise errors.UserError(f"config.label_smoothing={config.label_smoothing} must be in [0, 1)")
  _make_batch_mixer(config)
  unknown = set(config.final_eval_weights) - set(checkpoint.WEIGHT_NAMES)
  if unknown:
    raise errors.UserError(f"config.final_eval_weights has {sorted(unknown)}; known: "
                           f"{checkpoint.WEIGHT_NAMES}")
  losses.get(config.loss)
  for key in ("dtype", "param_dtype"):
    if config.model[key] not in FLOAT_DTYPES:
      raise errors.UserError(f"config.model.{key}={config.model[key]!r}; known: {FLOAT_DTYPES}")
  _check_grad_accum(config)


def _check_grad_accum(config):
  accum, devices = config.grad_accum_steps, jax.device_count()
  if accum < 1 or (accum > 1 and config.batch_size % (accum * devices)):
    raise errors.UserError(
        f"config.grad_accum_steps={accum} must be >= 1, and config.batch_size="
        f"{config.batch_size} a multiple of it times the {devices} devices")
  if accum > 1 and config.optimizer.sam_rho:
    raise errors.UserError("config.optimizer.sam_rho with config.grad_accum_steps > 1: SAM's "
                           "ascent step needs the whole batch's gradient; use one or the other")


def _make_batch_mixer(config):
  return mixing.make_batch_mixer(config.aug.mixup_alpha, config.aug.cutmix_alpha,
                                 config.aug.cutmix_switch_prob)


def _check_workdir_config(config, workdir):
  """A workdir made by a different config is refused, not mixed."""
  path = run_dir.config_path(workdir)
  if not os.path.exists(path):
    return
  resolved = json.loads(config.to_json())
  with open(path) as f:
    previous = json.load(f)
  if previous != resolved:
    changed = sorted(k for k in set(previous) | set(resolved)
                     if previous.get(k) != resolved.get(k))
    raise errors.UserError(f"{path} was written by a different config (keys {changed} "
                           "differ): use a new --workdir, or the original config to resume")


def _report_trainable(config, abstract_params):
  """Prints how many parameters train when some are frozen; refuses a run where none would."""
  mask = trainable_lib.mask_fn(config)
  if mask is None:
    return
  trains, total = trainable_lib.count(abstract_params, mask)
  what = "SSF tuning" if config.model.ssf else f"config.trainable={tuple(config.trainable)}"
  if not trains:
    raise errors.UserError(f"{what} matches no parameter of the model; parameter paths look like "
                           f"{sorted(trees.flatten(abstract_params))[:4]}")
  if jax.process_index() == 0:
    print(f"[train] {what}: {trains:,} trainable parameters of {total:,}", flush=True)


def _label_set(builder, dataset, classes):
  names = builder.info.features["label"].names if builder.name == dataset else None
  listed = ", ".join(names[c] for c in classes) if names and classes else "all"
  return f"{dataset} classes {tuple(classes) or 'all'} [{listed}]"


def warn_if_foreign_head(config, builder):
  """Warns when model_init's head, loaded as it is, was trained on other labels than this run's.

  The head loads whenever the class counts match and model_load.dont_load
  spares it; the label sets are known when model_init was exported by a run.
  """
  if not config.model_init or any(re.fullmatch(p, "head/kernel")
                                  for p in config.model_load.dont_load):
    return
  init_run = run_dir.containing(config.model_init)
  if init_run is None or jax.process_index():
    return
  upstream = run_dir.read_config(init_run)
  if upstream["num_classes"] != config.num_classes:
    return  # A head of another class count is re-initialised (train/pretrained.py).
  theirs = (upstream["input"]["dataset"], tuple(upstream["input"]["classes"]))
  ours = (config.input.dataset, tuple(config.input.classes))
  if theirs != ours:
    message = (f"config.model_init={config.model_init} carries a head trained on "
               f"{_label_set(builder, *theirs)}, and this run loads it for "
               f"{_label_set(builder, *ours)}: its outputs mean other classes. Start from a "
               "fresh head (config.model_load.dont_load=('head/.*',)) or, better, from a "
               "linear probe of the init (LP-FT; see docs/soups.md)")
    print(f"[train] WARNING {message}", flush=True)


def _say(message):
  """A `[train] ...` line on process 0's console, beside the progress bar."""
  if jax.process_index() == 0:
    print(f"[train] {message}", flush=True)


def _write_config(config, workdir):
  """Writes config.json once the run has started: a config that fails to start leaves none."""
  path = run_dir.config_path(workdir)
  if not os.path.exists(path) and jax.process_index() == 0:
    run_dir.write_config(workdir, json.loads(config.to_json()))


def state_from_params(params, tx):
  """The train state dict: weights, both EMAs (starting at the weights) and optimizer state."""
  return {"params": params, "ema_low": ema.init(params), "ema_high": ema.init(params),
          "opt_state": tx.init(params)}


def _abstract_state(model, tx, image_shape):
  """Shapes and dtypes of the train state, computed without allocating it."""
  return jax.eval_shape(
      lambda rng: state_from_params(model.init(rng, jnp.zeros((1, *image_shape)))["params"], tx),
      jax.random.key(0))


def _fresh_state(model, tx, config, image_shape, state_shardings):
  """Initial train state: random init, or the pre-trained .npz when config.model_init is set."""
  init = lambda rng: model.init(rng, jnp.zeros((1, *image_shape)))["params"]
  params_sharding = state_shardings["params"]
  params = jax.jit(init, out_shardings=params_sharding)(jax.random.key(config.seed))
  if config.model_init:
    loaded = pretrained.load_pretrained(
        sharding.to_host(params), config.model_init,
        dont_load=config.model_load.dont_load, ignore=config.model_load.ignore)
    params = jax.device_put(loaded, params_sharding)
  return jax.jit(lambda p: state_from_params(p, tx), out_shardings=state_shardings)(params)


def make_train_step(model, tx, loss_fn, label_smoothing, ema_decays, dropout_key,
                    trainable_mask=None, grad_accum_steps=1):
  """One optimizer step; the EMAs follow the updated weights.

  `trainable_mask` (train/trainable.py): frozen leaves get no gradient, so a
  linear probe's step runs no backward pass through the backbone.
  `grad_accum_steps` = k: the batch is split into k micro-batches whose
  gradients are averaged (in float32) before the one update, so a global batch
  k times larger than memory allows trains as if it were one batch.
  """
  def mean_loss(params, batch, rng):
    params = trainable_lib.stop_frozen_gradients(params, trainable_mask)
    logits = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
    return jnp.mean(loss_fn(logits, losses.smooth_labels(batch["labels"], label_smoothing)))

  def loss_and_grads(params, batch, rng):
    if grad_accum_steps == 1:
      return jax.value_and_grad(mean_loss)(params, batch, rng)
    # Micro-batch i takes every k-th example from i: each device's shard of the batch
    # holds its part of every micro-batch, so the split moves no data between devices.
    micro = jax.tree.map(lambda x: jnp.swapaxes(
        x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]), 0, 1), batch)

    def add_micro_batch(total, index_and_batch):
      index, micro_batch = index_and_batch
      loss, grads = jax.value_and_grad(mean_loss)(params, micro_batch,
                                                  jax.random.fold_in(rng, index))
      return jax.tree.map(lambda t, g: t + g.astype(jnp.float32), total, (loss, grads)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), (jnp.zeros(()), params))
    total, _ = jax.lax.scan(add_micro_batch, zeros, (jnp.arange(grad_accum_steps), micro))
    loss, grads = jax.tree.map(lambda t: t / grad_accum_steps, total)
    return loss, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

  def train_step(state, batch, step):
    rng = jax.random.fold_in(dropout_key, step)
    loss, grads = loss_and_grads(state["params"], batch, rng)
    # grad_fn serves SAM's ascent step; other optimizers ignore it.
    ascent_grads = lambda params, _: jax.grad(mean_loss)(params, batch, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"],
                                   grad_fn=ascent_grads)
    params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state}
    for name, decay in ema_decays.items():
      new_state[name] = ema.update(state[name], params, decay)
    # param_norm is non-finite as soon as one weight is: checked before every save.
    return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads),
                       "param_norm": optax.global_norm(params)}
  return train_step


def jit_train_step(config, model, tx, mesh, state_shardings):
  """The trainer's compiled step `(state, batch, step) -> (state, metrics)`; donates `state`.

  Public so that benchmarks time the very step that training runs.
  """
  dropout_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  step = make_train_step(model, tx, losses.get(config.loss), config.label_smoothing,
                         ema.decays(config.ema), dropout_key, trainable_lib.mask_fn(config),
                         config.grad_accum_steps)
  return jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh), None),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def _check_finite(step, metrics, manager):
  """Stops on a NaN/inf metric before it can reach a checkpoint."""
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    checkpoint.wait_until_written(manager)
    last = manager.latest_step()
    raise FloatingPointError(
        f"step {step}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; stopping. "
        + (f"The last good checkpoint is step {last} in {manager.directory}" if last is not None
           else "No checkpoint was written."))


def train_and_evaluate(config, workdir):
  """Trains (or resumes) the run described by `config` in `workdir`; returns results."""
  workdir = os.path.abspath(workdir)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  for key, value in pretrained.adopt_architecture(config.model, config.model_init).items():
    _say(f"model.{key}={value!r}, as {run_dir.sibling_config(config.model_init)} records for "
         "config.model_init")
  builder = data.dataset_builder(config.input.dataset, config.input.data_dir)
  _check_config(config, builder)
  data.check_heldout_split(builder, config.input.train_split, config.input.heldout_split,
                           config.input.test_split)
  _check_workdir_config(config, workdir)
  if run_dir.is_finished(workdir):
    _say(f"{run_dir.results_path(workdir)} exists: the run is complete")
    return run_dir.read_results(workdir)
  warn_if_foreign_head(config, builder)

  classes = tuple(config.input.classes)
  splits = {key: data.open_split(builder, config.input[key], classes, f"config.input.{key}")
            for key in ("train_split", "heldout_split", "test_split")}
  mesh = sharding.make_mesh(config.mesh)
  model = vit.build_model(config.model, config.num_classes)
  tx, schedule = optimizer.make_optimizer(config)
  loss_fn = losses.get(config.loss)
  manager = checkpoint.make_manager(workdir, config.checkpoint.every_steps, config.checkpoint.keep)
  start_step = manager.latest_step() or 0

  batches = data.train_batches(
      splits["train_split"], preprocess.build(pp_spec.resolve(config, "pp_train")),
      # At least one batch: its shape builds the model even when only the export is left.
      config.batch_size, config.seed, start_step, max(config.total_steps, start_step + 1),
      process_index=jax.process_index(),
      process_count=jax.process_count(), num_threads=config.input.num_threads,
      batch_fn=_make_batch_mixer(config))
  first_batch = next(batches)
  image_shape = first_batch["image"].shape[1:]

  abstract_state = _abstract_state(model, tx, image_shape)
  _report_trainable(config, abstract_state["params"])
  state_shardings = sharding.tree_shardings(mesh, abstract_state, config.param_sharding)
  if start_step:
    _say(f"resuming from step {start_step}")
    state = checkpoint.restore(manager, start_step,
                               sharding.abstract_tree(abstract_state, state_shardings))
  else:
    state = _fresh_state(model, tx, config, image_shape, state_shardings)
    if config.model_init and jax.process_index() == 0:
      run_dir.write_init(workdir, config.model_init)
  _write_config(config, workdir)

  batch_sharding = sharding.batch_sharding(mesh)
  train_step = jit_train_step(config, model, tx, mesh, state_shardings)
  evaluators = {
      key: accuracy.SplitAccuracy(
          model, mesh, splits[key], preprocess.build(pp_spec.resolve(config, "pp_eval")),
          config.eval_batch_size, loss_fn, state_shardings["params"],
          num_threads=config.input.num_threads)
      for key in ("heldout_split", "test_split")}

  writer = run_log.make_writer(workdir, start_step)
  progress = run_log.Progress(config.total_steps, start_step, config.batch_size)
  host_batch = first_batch
  with preemption.Notice() as notice:  # SIGTERM: checkpoint, then stop.
    try:
      for step in range(start_step + 1, config.total_steps + 1):
        batch = sharding.to_global({k: host_batch[k] for k in ("image", "labels")}, batch_sharding)
        state, metrics = train_step(state, batch, jnp.int32(step - 1))
        if step == start_step + 1:
          jax.block_until_ready(metrics)
          progress.start_clock(step)
        log_now = step % config.log_every_steps == 0 or step == config.total_steps
        preempted = step < config.total_steps and notice.reached(step)
        if log_now or preempted or manager.should_save(step):
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          _check_finite(step, metrics, manager)
        if log_now:
          metrics["lr"] = float(schedule(step - 1))
          metrics.update(progress.rates(step))
          writer.write_scalars(step, metrics)
          progress.report(step, {k: metrics[k] for k in ("loss", "lr")})
        with progress.paused():
          if config.eval_every_steps and step % config.eval_every_steps == 0:
            heldout = evaluators["heldout_split"].evaluate(state["params"])
            writer.write_scalars(step, {"heldout_accuracy": heldout["accuracy"]})
          checkpoint.save(manager, step, state, force=step == config.total_steps or preempted)
        if preempted:
          writer.flush()
          raise preemption.Preempted(step, manager.directory)
        if step < config.total_steps:
          host_batch = next(batches)
    finally:
      checkpoint.wait_until_written(manager)  # A checkpoint in flight completes, even on error.
  return _finish(config, workdir, state, evaluators, writer)


def _finish(config, workdir, state, evaluators, writer):
  """Exports every weight set as .npz and writes held-out/test accuracy to results.json.

  Exports are plain big_vision ViTs (`pretrained.export_npz`): SSF vectors folded in,
  a scanned encoder split back into its blocks.
  """
  results = {"step": config.total_steps, "heldout": {}, "test": {}}
  for name in config.final_eval_weights:
    results["heldout"][name] = evaluators["heldout_split"].evaluate(state[name])
    results["test"][name] = evaluators["test_split"].evaluate(state[name])
  weights = sharding.to_host({name: state[name] for name in checkpoint.WEIGHT_NAMES})
  if jax.process_index() == 0:
    for name, params in weights.items():
      pretrained.export_npz(run_dir.exported_weights(workdir, name), params)
    writer.write_scalars(config.total_steps, {
        f"{split}_accuracy/{name}": r["accuracy"]
        for split in ("heldout", "test") for name, r in results[split].items()})
    writer.flush()
    run_dir.write_results(workdir, results)
  for name in config.final_eval_weights if jax.process_index() == 0 else ():
    print(f"[{name}] held-out accuracy {results['heldout'][name]['accuracy']:.4f} | "
          f"test accuracy {results['test'][name]['accuracy']:.4f}")
  return results
