r"""A pod plan: will a sweep fit a mesh, how long will it run, what will it cost?

  python -m launch plan --sweep=configs/sweeps/imagenet_vit_g.py --devices=256 \
      --mesh="(('data',-1),('fsdp',16))" --accelerator=v4 [--mfu=0.4]

Lowers and compiles the trainer's train step, its evaluation step and the
soup step's running-sum add for every distinct shape of run in the sweep,
with abstract inputs (`jax.ShapeDtypeStruct`s carrying the real shardings:
no weights, no data) on `--devices` fake CPU devices, and prints per device:
parameter, optimizer-state and EMA bytes (from the shardings), XLA's memory
analysis of each step (arguments, outputs, temporaries: activations and
scratch), XLA's FLOPs per step, the step time at `--peak_tflops` and
`--mfu`, and hours and device-hours per run and for the sweep. A run that
does not fit `--device_memory` is named with what to change.
"""

import ast
import dataclasses
import os
import re

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections.config_flags import config_path
import numpy as np

from launch import sweep as sweep_lib
from soups import averaging
from soups import restore
from train import errors
from train import losses
from train import optimizer
from train import pp_spec
from train import sharding
from train import trees
from train import vit

# train.trainer and train.accuracy import TensorFlow (seconds): imported when a plan runs,
# not by every `python -m launch`.

# Public per-chip figures: dense bfloat16 TFLOP/s and HBM. TPU v4, v5e and v5p:
# cloud.google.com/tpu/docs/system-architecture-tpu-vm (v4: 275, 32 GiB; v5e: 197,
# 16 GiB; v5p: 459, 95 GiB). NVIDIA A100 and H100 SXM datasheets (A100: 312,
# 80 GB; H100: 989, 80 GB; without sparsity).
ACCELERATORS = {
    "v4": (275.0, 32 * 2**30),
    "v5e": (197.0, 16 * 2**30),
    "v5p": (459.0, 95 * 2**30),
    "a100": (312.0, 80 * 10**9),
    "h100": (989.0, 80 * 10**9),
}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

_DEVICES = flags.DEFINE_integer("devices", 8, "plan: number of devices of the pod (faked on CPU).")
_MESH = flags.DEFINE_string("mesh", "", "plan: the mesh, e.g. \"(('data',-1),('fsdp',16))\"; "
                                        "default: each run's config.mesh.")
_ACCELERATOR = flags.DEFINE_enum("accelerator", None, list(ACCELERATORS),
                                 "plan: preset peak TFLOP/s and memory per device.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "plan: peak TFLOP/s per device.")
_DEVICE_MEMORY = flags.DEFINE_string("device_memory", None,
                                     "plan: memory per device, e.g. 32GiB or 80GB.")
_MFU = flags.DEFINE_float("mfu", 0.4, "plan: assumed model FLOP utilisation (0-1].")


def parse_bytes(text):
  """'32GiB' -> 34359738368; '80GB' -> 80e9 (binary and decimal units, case-insensitive)."""
  match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text or "")
  if not match or match.group(2).upper() not in _UNITS:
    raise errors.UserError(f"--device_memory={text!r}: expected a size like 32GiB or 80GB")
  return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def use_fake_devices(count):
  """Makes JAX see `count` CPU devices; must run before JAX starts its backend (a backend
  already started with `count` devices is used as it is)."""
  # XLA reads XLA_FLAGS when the backend starts: a device count there would override ours.
  others = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                  os.environ.get("XLA_FLAGS", "")).strip()
  if others:
    os.environ["XLA_FLAGS"] = others
  else:
    os.environ.pop("XLA_FLAGS", None)
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError as e:  # The backend is up: its device count is fixed.
    if jax.device_count() != count:
      raise errors.UserError(f"JAX already started its backend with {jax.device_count()} "
                             f"devices; run `python -m launch plan` in its own process to plan "
                             f"for {count}") from e
  if jax.device_count() != count:
    raise errors.UserError(f"JAX sees {jax.device_count()} devices, not {count}")


@dataclasses.dataclass
class StepPlan:
  """Per-device figures of one compiled step."""
  name: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  flops: float

  @property
  def peak_bytes(self):
    """What the step holds at once: its inputs, outputs not aliased to inputs, temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def step_plan(name, compiled, model_flops):
  memory = compiled.memory_analysis()
  return StepPlan(name, memory.argument_size_in_bytes, memory.output_size_in_bytes,
                  memory.alias_size_in_bytes, memory.temp_size_in_bytes, model_flops)


def _flops(lowered):
  """XLA's FLOP count of a lowered (not yet partitioned) step: the whole mesh's."""
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def bytes_per_device(abstract_tree):
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard's)."""
  return sum(int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(abstract_tree))


@dataclasses.dataclass
class RunPlan:
  """The plan of one shape of run and the sweep's runs that share it."""
  runs: list
  variant: str
  image_shape: tuple
  batch_size: int
  total_steps: int
  params: int  # Parameter count.
  state_bytes: dict  # Per device: params, opt_state, ema_low, ema_high.
  steps: list  # StepPlan of train, eval, soup add.
  mesh: dict
  config: object  # The first run's config.

  @property
  def train(self):
    return self.steps[0]

  def peak_bytes(self):
    return max(step.peak_bytes for step in self.steps)


def image_shape(config):
  """The train batch's image shape, found by running pp_train on a stand-in image (TF)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from train import preprocess  # pylint: disable=g-import-not-at-top
  try:  # The stored image shape when the builder knows it (no data needed), else 512x512x3.
    stored = tfds.builder(config.input.dataset, data_dir=config.input.data_dir or None,
                          ).info.features["image"].shape
  except Exception:  # pylint: disable=broad-except
    stored = (None, None, 3)
  height, width, channels = (512 if s is None else s for s in stored)
  encoded = tf.io.encode_png(tf.zeros((height, width, channels), tf.uint8))
  example = preprocess.build(pp_spec.resolve(config, "pp_train"))(
      {"image": encoded, "label": tf.constant(0, tf.int64)}, tf.constant([0, 0], tf.int64))
  return tuple(int(d) for d in example["image"].shape)


def _lower_steps(config, shape):
  """The train, eval and soup-add steps of `config` lowered on its mesh with abstract inputs;
  also the abstract train state (sharded)."""

  from train import accuracy  # pylint: disable=g-import-not-at-top
  from train import trainer  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(config.mesh)
  model = vit.build_model(config.model, config.num_classes)
  tx, _ = optimizer.make_optimizer(config)
  abstract = trainer._abstract_state(model, tx, shape)  # pylint: disable=protected-access
  shardings = sharding.tree_shardings(mesh, abstract, config.param_sharding)
  state = sharding.abstract_tree(abstract, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = lambda size, **extra: {  # pylint: disable=g-long-lambda
      "image": jax.ShapeDtypeStruct((size, *shape), jnp.float32, sharding=batch_sharding),
      "labels": jax.ShapeDtypeStruct((size, config.num_classes), jnp.float32,
                                     sharding=batch_sharding), **extra}
  train = trainer.jit_train_step(config, model, tx, mesh, shardings).lower(
      state, batch(config.batch_size), jax.ShapeDtypeStruct((), jnp.int32))
  eval_size = -(-config.eval_batch_size // mesh.size) * mesh.size
  mask = jax.ShapeDtypeStruct((eval_size,), jnp.float32, sharding=batch_sharding)
  evaluate = accuracy.jit_eval_step(model, losses.get(config.loss), mesh,
                                    shardings["params"]).lower(
                                        state["params"], batch(eval_size, mask=mask))
  metadata = {k: (tuple(v.shape), v.dtype) for k, v in trees.flatten(abstract["ema_low"]).items()}
  soup = averaging.lowered_add(restore.target_abstract(metadata, mesh))
  return (train, evaluate, soup), state, mesh


def plan_run(config, runs):
  """Compiles the train, eval and soup steps of `config` on the current devices; a RunPlan.

  Memory is XLA's analysis of the steps as they will run. FLOPs are the
  model's: XLA's count of the steps lowered without `model.scan_layers` and
  `model.remat` (XLA counts a scanned loop's body once, and recomputed
  activations are not model FLOPs), divided by the devices.
  """
  shape = image_shape(config)
  lowered, state, mesh = _lower_steps(config, shape)
  plain = config.copy_and_resolve_references()
  plain.model.scan_layers = plain.model.remat = False
  plain_lowered = lowered if plain == config else _lower_steps(plain, shape)[0]
  names = ("train step", "eval step", "soup add")
  steps = [step_plan(name, step.compile(), _flops(plain_step) / mesh.size)
           for name, step, plain_step in zip(names, lowered, plain_lowered)]
  return RunPlan(
      runs=runs, variant=config.model.variant, image_shape=shape, batch_size=config.batch_size,
      total_steps=config.total_steps,
      params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"])),
      state_bytes={name: bytes_per_device(state[name])
                   for name in ("params", "opt_state", "ema_low", "ema_high")},
      steps=steps, mesh=dict(mesh.shape), config=config)


# Keys that change what the train, eval and soup steps compile to (shapes, FLOPs, memory).
_SHAPE_KEYS = ("model", "num_classes", "batch_size", "eval_batch_size", "grad_accum_steps",
               "optimizer.name", "optimizer.sam_rho", "loss", "mesh", "param_sharding",
               "trainable")


def run_configs(sweep_spec, mesh=None):
  """[(name, locked config)] of the sweep's start run (if any) and grid runs; `mesh` overrides
  every run's config.mesh."""

  sweep = sweep_lib.load(sweep_spec)
  start = sweep_lib.start_run(sweep, sweep_spec)
  named = [(start.name, start.base, start.overrides)] if start else []
  named += [(run.name, sweep["base"], run.overrides) for run in sweep_lib.expand(sweep, sweep_spec)]
  configs = []
  for name, base, overrides in named:
    config = sweep_lib.base_config(base).copy_and_resolve_references()
    config.update_from_flattened_dict(overrides)
    if mesh:
      try:
        config.mesh = tuple(tuple(axis) for axis in ast.literal_eval(mesh))
      except (ValueError, SyntaxError, TypeError) as e:
        raise errors.UserError(f"--mesh={mesh!r} is not a tuple of (name, size) pairs") from e
    configs.append((name, config))
  return configs


def plan_sweep(sweep_spec, mesh=None):
  """RunPlans of the sweep, one per distinct shape of run (each lists its runs' names)."""
  groups = {}
  for name, config in run_configs(sweep_spec, mesh):
    key = repr([config_path.get_value(k, config) for k in _SHAPE_KEYS] + [image_shape(config)])
    groups.setdefault(key, []).append((name, config))
  plans = []
  for members in groups.values():
    plan = plan_run(members[0][1], [name for name, _ in members])
    plan.total_steps = {name: config.total_steps for name, config in members}
    plans.append(plan)
  return plans


def advice(plan, device_memory):
  """What to change when a step of `plan` does not fit `device_memory` bytes per device."""
  config, changes = plan.config, []
  train, evaluate = plan.steps[0], plan.steps[1]
  if train.peak_bytes > device_memory:
    if plan.state_bytes["params"] * 1.01 >= plan.params * 4:
      changes.append("shard the weights, optimizer state and EMAs: a mesh axis 'fsdp' and "
                     "config.param_sharding=(('.*', 'fsdp(axis=\"fsdp\")'),)")
    else:
      changes.append("more FSDP: a larger 'fsdp' mesh axis")
    if not config.model.remat:
      changes.append("config.model.remat=True (activations recomputed, not kept)")
    changes.append(f"a smaller config.batch_size (now {config.batch_size}), or the same batch "
                   f"with config.grad_accum_steps={2 * config.grad_accum_steps} or more")
  if evaluate.peak_bytes > device_memory:
    changes.append(f"a smaller config.eval_batch_size (now {config.eval_batch_size})")
  return changes


def _size(n):
  """Bytes in the largest binary unit that keeps the number at least 1: '1.25 GiB'."""
  for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"


def _flop(n):
  for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f} FLOP"


def train_step_seconds(plan, peak_tflops, mfu):
  """The train step's time on a device of `peak_tflops` running at `mfu` of its peak."""
  return plan.train.flops / (peak_tflops * 1e12 * mfu)


def report(plans, devices, peak_tflops, device_memory, mfu):
  """The plan as text: one block per shape of run, then the sweep's totals."""
  lines, sweep_hours = [], 0.0
  for plan in plans:
    step_seconds = train_step_seconds(plan, peak_tflops, mfu)
    lines += [
        f"== {plan.variant}, images {plan.image_shape}, batch {plan.batch_size}, "
        f"mesh {plan.mesh}: {len(plan.runs)} run(s) {', '.join(plan.runs[:4])}"
        + (" ..." if len(plan.runs) > 4 else ""),
        f"  parameters {plan.params:,}; per device: params {_size(plan.state_bytes['params'])}, "
        f"optimizer state {_size(plan.state_bytes['opt_state'])}, ema_low "
        f"{_size(plan.state_bytes['ema_low'])}, ema_high {_size(plan.state_bytes['ema_high'])}"]
    for step in plan.steps:
      lines.append(f"  {step.name}: arguments {_size(step.argument_bytes)}, outputs "
                   f"{_size(step.output_bytes - step.alias_bytes)} (not aliased), temporaries "
                   f"{_size(step.temp_bytes)}; peak {_size(step.peak_bytes)} per device; "
                   f"{_flop(step.flops)} per device")
    fits = plan.peak_bytes() <= device_memory
    lines.append(f"  peak {_size(plan.peak_bytes())} of {_size(device_memory)} per device: "
                 + ("fits" if fits else "DOES NOT FIT"))
    lines += [f"    - {change}" for change in advice(plan, device_memory)]
    run_hours = {name: steps * step_seconds / 3600 for name, steps in plan.total_steps.items()}
    sweep_hours += sum(run_hours.values())
    per_run = sorted({(steps, steps * step_seconds / 3600) for steps in plan.total_steps.values()})
    lines.append(f"  train step {step_seconds * 1e3:.1f} ms at {peak_tflops:g} TFLOP/s and MFU "
                 f"{mfu:g}; per run: " + ", ".join(
                     f"{hours:.2f} h, {hours * devices:.0f} device-hours ({steps} steps)"
                     for steps, hours in per_run))
  lines.append(f"sweep: {sum(len(p.runs) for p in plans)} runs, {sweep_hours:.2f} h on "
               f"{devices} devices one run after another, {sweep_hours * devices:.0f} "
               "device-hours (train steps only: evaluation and checkpoints not counted)")
  return "\n".join(lines)


def main(sweep_spec):
  """`python -m launch plan`: fakes the devices, plans the sweep, prints the plan."""
  if not sweep_spec:
    raise errors.UserError("plan needs --sweep=configs/sweeps/<file>.py:<arg>")
  peak, memory = ACCELERATORS.get(_ACCELERATOR.value, (None, None))
  peak = _PEAK_TFLOPS.value or peak
  memory = parse_bytes(_DEVICE_MEMORY.value) if _DEVICE_MEMORY.value else memory
  if not peak or not memory:
    raise errors.UserError("plan needs --accelerator, or both --peak_tflops and --device_memory")
  if not 0 < _MFU.value <= 1:
    raise errors.UserError(f"--mfu={_MFU.value} must be in (0, 1]")
  use_fake_devices(_DEVICES.value)
  plans = plan_sweep(sweep_spec, _MESH.value or None)
  print(report(plans, _DEVICES.value, peak, memory, _MFU.value))
  return plans
