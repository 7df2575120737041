r"""Training-step throughput on this machine: stockpot's jitted step against timm on PyTorch.

For each ViT of bench/train_step.py's MODELS (the default pico/7 at 28x28x1
with 10 classes; S/16 and B/16 at 224x224x3 with 1000 classes), one fixed
batch of random images is trained on by
  stockpot       `train.trainer.jit_train_step`, the step `python -m train` runs
                 (bench/train_step.py),
                 with configs/fashion_mnist.py's fine-tuning optimizer (SGD with
                 momentum, clipping by global norm) and both EMAs; float32;
  timm eager     the same model and step in timm + PyTorch (bench/torch_peer.py,
                 run in its own venv, `make .venv-bench/.installed`);
  timm compiled  the same with `torch.compile(model)`.
The sides take turns, `--repeats` rounds of a few steps each (who goes first
rotates), so that load from elsewhere hits them alike; medians are reported.
Each round also times a float32 N x N x N matmul in JAX and in PyTorch: the
better median of the two is the CPU's matmul FLOP/s.

Achieved FLOP/s count the model's FLOPs per step (matmuls, patch embedding,
attention: 3x the forward's, less the patch embedding's input gradient), the
same count for every side. XLA's `cost_analysis()` of the compiled step and
torch's FlopCounterMode are reported beside it: XLA's also counts elementwise
ops and FlopCounterMode misses the CPU attention kernel, so each framework's
own count would flatter JAX.

  make bench-train
  # or: python -m bench.train_throughput --out=bench/results/train_throughput.json
"""

from train import command
from train import tf_setup  # First: TensorFlow loads without its C++ start-up lines.

# isort: split

import json
import os
import platform
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from bench import train_step
from bench.flops import model_flops
from train import files
from train import vit

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_peer.py")

_MODELS = flags.DEFINE_list("models", list(train_step.MODELS),
                            f"ViT variants to time, of {list(train_step.MODELS)}.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds per side.")
_COMPILE = flags.DEFINE_bool("torch_compile", True, "Also time the torch.compile'd peer.")
_PEER_PYTHON = flags.DEFINE_string("peer_python", ".venv-bench/bin/python",
                                   "Python of the venv holding torch and timm.")
_MATMUL = flags.DEFINE_integer("matmul_size", 2048, "N of the N x N x N matmul.")
_OUT = flags.DEFINE_string("out", "", "Where to write the JSON results.")


class TorchPeer:
  """bench/torch_peer.py in a subprocess of the peer venv, answering one request at a time."""

  def __init__(self, config, spec, compiled):
    v = vit.decode_variant(config.model.variant)
    args = dict(width=v["width"], depth=v["depth"], num_heads=v["num_heads"],
                mlp_dim=v["mlp_dim"], patch_size=v["patch_size"][0],
                image_size=spec["image_size"], channels=spec["channels"],
                num_classes=config.num_classes, batch_size=config.batch_size, lr=config.lr,
                momentum=config.optimizer.momentum, clip_norm=config.optimizer.grad_clip_norm)
    command = [_PEER_PYTHON.value, PEER, *(f"--{k}={v}" for k, v in args.items()),
               "--ema_decays", str(config.ema.low), str(config.ema.high)]
    self._process = subprocess.Popen(command + (["--compile"] if compiled else []),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.info = self._reply()

  def _reply(self):
    line = self._process.stdout.readline()
    if not line:
      raise RuntimeError(f"{PEER} exited with code {self._process.wait()} (its stderr is above)")
    return json.loads(line)

  def _ask(self, command):
    self._process.stdin.write(command + "\n")
    self._process.stdin.flush()
    return self._reply()

  def time(self, steps):
    return self._ask(f"steps {steps}")["seconds"]

  def matmul_flops_per_s(self, n):
    return self._ask(f"matmul {n}")["flops_per_s"]

  def close(self):
    self._process.stdin.close()
    self._process.wait()


def jax_matmul_flops_per_s(n, repeats=5):
  """Float32 FLOP/s of a jitted jnp.matmul on two n x n matrices, the best of `repeats`."""
  a = jax.random.normal(jax.random.key(0), (n, n))
  b = jax.random.normal(jax.random.key(1), (n, n))
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def benchmark(variant):
  """Times every side on `variant`, taking turns; returns the model's results dict."""
  spec = train_step.MODELS[variant]
  config = train_step.benchmark_config(variant, spec)
  sides = {"stockpot": train_step.TrainStep(
      config, (spec["image_size"], spec["image_size"], spec["channels"]))}
  print(f"[{variant}] stockpot step compiled in {sides['stockpot'].compile_s:.1f}s", flush=True)
  sides["timm eager"] = TorchPeer(config, spec, compiled=False)
  if _COMPILE.value:
    sides["timm compiled"] = TorchPeer(config, spec, compiled=True)
  seconds = {name: [] for name in sides}
  matmul = {"jax": [], "torch": []}
  names = list(sides)
  for round_ in range(_REPEATS.value):
    for name in names[round_ % len(names):] + names[:round_ % len(names)]:
      seconds[name].append(sides[name].time(spec["steps"]))
    matmul["jax"].append(jax_matmul_flops_per_s(_MATMUL.value))
    matmul["torch"].append(sides["timm eager"].matmul_flops_per_s(_MATMUL.value))
  peer_info = sides["timm eager"].info
  for name in names[1:]:
    sides[name].close()

  flops = model_flops(variant, spec["image_size"], spec["channels"], config.num_classes,
                      config.batch_size)
  matmul_median = {k: statistics.median(v) for k, v in matmul.items()}
  roof = max(matmul_median.values())
  rows = []
  for name in names:
    step_s = statistics.median(seconds[name]) / spec["steps"]
    rows.append({"side": name, "img_per_s": config.batch_size / step_s, "ms_per_step": 1e3 * step_s,
                 "achieved_flops_per_s": flops / step_s,
                 "fraction_of_matmul": flops / step_s / roof,
                 "img_per_s_rounds": [config.batch_size * spec["steps"] / s
                                      for s in seconds[name]]})
  for row in rows:
    row["stockpot_ratio"] = rows[0]["img_per_s"] / row["img_per_s"]
  return {"variant": variant, **spec, "repeats": _REPEATS.value,
          "flops_per_step": {"model": flops, "xla_cost_analysis": sides["stockpot"].xla_flops,
                             "torch_flop_counter": peer_info["flop_counter_flops"]},
          "matmul_flops_per_s": matmul_median, "matmul_flops_per_s_rounds": matmul,
          "peer": peer_info, "rows": rows}


def print_table(result):
  f = result["flops_per_step"]
  m = result["matmul_flops_per_s"]
  print(f"\nViT-{result['variant']} {result['image_size']}x{result['image_size']}x"
        f"{result['channels']}, {result['num_classes']} classes, batch {result['batch_size']}, "
        f"float32. GFLOP/step: model {f['model'] / 1e9:.2f}, "
        f"XLA {f['xla_cost_analysis'] / 1e9:.2f}, "
        f"torch FlopCounterMode {f['torch_flop_counter'] / 1e9:.2f}. Matmul "
        f"{_MATMUL.value}^3: JAX {m['jax'] / 1e9:.1f}, PyTorch {m['torch'] / 1e9:.1f} GFLOP/s")
  print(f"{'side':<15} {'img/s':>9} {'ms/step':>9} {'GFLOP/s':>8} {'÷ matmul':>9} "
        f"{'stockpot ÷':>11}")
  for row in result["rows"]:
    print(f"{row['side']:<15} {row['img_per_s']:>9,.1f} {row['ms_per_step']:>9,.1f} "
          f"{row['achieved_flops_per_s'] / 1e9:>8.1f} {row['fraction_of_matmul']:>9.2f} "
          f"{row['stockpot_ratio']:>10.2f}x")


def cpu_name():
  """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def main(argv):
  del argv
  tf_setup.hide_gpus_from_tensorflow()
  unknown = set(_MODELS.value) - set(train_step.MODELS)
  if unknown:
    raise app.UsageError(f"--models has {sorted(unknown)}; known: {list(train_step.MODELS)}")
  if not os.access(_PEER_PYTHON.value, os.X_OK):
    raise app.UsageError(f"--peer_python={_PEER_PYTHON.value} is not there: "
                         "make .venv-bench/.installed")
  load_before = os.getloadavg()
  results = [benchmark(variant) for variant in _MODELS.value]
  machine = {"cpu": cpu_name(), "cores": os.cpu_count(),
             "load_average_before": load_before, "load_average_after": os.getloadavg(),
             "jax": jax.__version__, "python": sys.version.split()[0]}
  for result in results:
    print_table(result)
  print(f"\nload average (1, 5, 15 min): {load_before} before, {machine['load_average_after']} "
        "after: more than the cores means the timings shared the CPU")
  if _OUT.value:
    files.write_json_atomic(_OUT.value, {"machine": machine, "models": results})


if __name__ == "__main__":
  command.run(main)
