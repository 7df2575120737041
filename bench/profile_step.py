r"""Where the trainer's step spends its time: a `jax.profiler` trace, op by op, by model part.

Traces `--steps` steps of the trainer's jitted step (bench/train_step.py) and
names every XLA op of the trace by the model part its HLO metadata points to
(`op_name`, JAX's name stack: `jvp(...)` is the forward pass,
`transpose(jvp(...))` the backward). XLA:CPU runs independent ops side by
side, so each instant is shared among the ops running then: the rows add up
to the traced time, and `idle` is time when no op ran (dispatch, waits).

  python -m bench.profile_step --variant=S/16 --out=bench/results/profile_s16.json
"""

from train import command
from train import tf_setup  # First: TensorFlow loads without its C++ start-up lines.

# isort: split

import collections
import glob
import gzip
import json
import os
import re
import tempfile

from absl import app
from absl import flags
import jax

from bench import train_step
from train import files

_VARIANT = flags.DEFINE_string("variant", "S/16", "One of bench/train_step.py's MODELS.")
_STEPS = flags.DEFINE_integer("steps", 4, "Steps traced (after two untraced warm-up steps).")
_OUT = flags.DEFINE_string("out", "", "Where to write the JSON results.")

# (row, what the op_name's module path must contain), first match wins.
_PARTS = (
    ("patch embedding", "/embedding/"),
    ("attention query/key/value/out (matmul, bias)",
     r"/MultiHeadDotProductAttention_0/(query|key|value|out)/"),
    ("attention scores, softmax, values", "/MultiHeadDotProductAttention_0/"),
    ("MLP Dense_0, Dense_1 (matmul, bias)", r"/MlpBlock_0/Dense_[01]/"),
    ("MLP GELU", "/MlpBlock_0/"),
    ("LayerNorms", r"/(LayerNorm_[01]|encoder_norm)/"),
    ("head", "/head/"),
    ("residual adds, pooling, position embedding", "VisionTransformer"),
)
LOSS_AND_UPDATE = "loss, optimizer, EMAs, norms"
_OP_LINE = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"")


def op_names(hlo_text):
  """{HLO instruction name: the op_name of its metadata} of a compiled module's text."""
  return dict(m.groups() for m in map(_OP_LINE.match, hlo_text.splitlines()) if m)


def part_of(op_name):
  """(model part, 'forward'/'backward'/'') of an op, from its op_name."""
  direction = "backward" if "transpose(jvp(" in op_name else "forward"
  for part, pattern in _PARTS:
    if re.search(pattern, op_name):
      return part, direction
  return LOSS_AND_UPDATE, ""


def shared_time(events, names):
  """{op: microseconds}, each instant split evenly among the named ops running then, and the
  microseconds when none ran, between the first op's start and the last one's end."""
  edges = sorted((t, step, e["name"]) for e in events if e["name"] in names
                 for t, step in ((e["ts"], 1), (e["ts"] + e["dur"], -1)))
  running, shares, idle, last = collections.Counter(), collections.Counter(), 0.0, None
  for t, step, name in edges:
    if last is not None and t > last:
      count = sum(running.values())
      if count:
        for op, n in running.items():
          shares[op] += (t - last) * n / count
      else:
        idle += t - last
    running[name] += step
    last = t
  return shares, idle


def profile(variant, steps):
  """Traces `steps` steps of `variant`; returns the results dict (rows in ms per step)."""
  spec = train_step.MODELS[variant]
  config = train_step.benchmark_config(variant, spec)
  step = train_step.TrainStep(config, (spec["image_size"], spec["image_size"], spec["channels"]))
  names = op_names(step.hlo_text)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      seconds = step.time(steps)
    (trace,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(trace) as f:
      events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
  shares, idle = shared_time(events, names)
  rows = collections.Counter()
  for op, micros in shares.items():
    rows[part_of(names[op])] += micros / 1e3 / steps
  traced = sum(rows.values()) + idle / 1e3 / steps
  table = [{"part": part, "pass": direction, "ms_per_step": ms, "share": ms / traced}
           for (part, direction), ms in rows.most_common()]
  table.append({"part": "idle (no op running)", "pass": "", "ms_per_step": idle / 1e3 / steps,
                "share": idle / 1e3 / steps / traced})
  return {"variant": variant, **spec, "steps_traced": steps,
          "wall_ms_per_step": 1e3 * seconds / steps, "traced_ms_per_step": traced, "rows": table}


def print_table(result):
  print(f"\nViT-{result['variant']}, batch {result['batch_size']}: "
        f"{result['wall_ms_per_step']:,.0f} ms/step while traced\n")
  print("| part | pass | ms/step | share |\n| --- | --- | ---: | ---: |")
  for row in result["rows"]:
    print(f"| {row['part']} | {row['pass']} | {row['ms_per_step']:,.0f} | "
          f"{100 * row['share']:.1f}% |")


def main(argv):
  del argv
  tf_setup.hide_gpus_from_tensorflow()
  if _VARIANT.value not in train_step.MODELS:
    raise app.UsageError(f"--variant={_VARIANT.value}; known: {list(train_step.MODELS)}")
  result = profile(_VARIANT.value, _STEPS.value)
  print_table(result)
  if _OUT.value:
    files.write_json_atomic(_OUT.value, result)


if __name__ == "__main__":
  command.run(main)
