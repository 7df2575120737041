"""Every command's error path (train/command.py): a user mistake is one `FATAL ...` line on
stderr and exit status 2, a bug keeps its traceback and exit status 1, `--traceback` shows a
user mistake's traceback too, and library INFO logs stay off the console unless asked for.

The real commands are run as a user runs them, on the mistakes of issue #26; the wrapper's
own cases run a tiny command built with it, this file (`python -m tests.test_cli --fail=...`).
"""

import json
import os
import re

from absl import app
from absl import flags
import pytest

from configs import fashion_mnist
from tests.helpers import run_module
from train import command
from train import errors
from train import run_dir

# An absl INFO line, Python's (`I1203 10:00:00.000000 123 file.py:12] ...`) or C++'s
# (TensorFlow's `I0000 00:00:1796373966.103674 2903 port.cc:153] oneDNN ...`).
INFO_LINE = re.compile(r"^I\d{4} [\d:.]+ +\d+ \S+:\d+\] ", re.MULTILINE)


def _lines(stderr):
  return [line for line in stderr.splitlines() if line.strip()]


def assert_one_fatal_line(proc, expected):
  """Exit status 2; stderr ends in the one FATAL line, which starts with `FATAL expected`;
  no traceback and no INFO log line."""
  lines = _lines(proc.stderr)
  assert proc.returncode == command.EXIT_USER_ERROR, proc.stderr[-3000:]
  assert lines and lines[-1].startswith(f"FATAL {expected}"), proc.stderr[-3000:]
  assert [line for line in lines if line.startswith("FATAL")] == lines[-1:]
  assert "Traceback" not in proc.stderr
  assert not INFO_LINE.search(proc.stderr), proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An upstream and a downstream run (their classes differ), written with the library's own
  writers: an orbax checkpoint of `ema_low`, config.json, results.json."""
  from tests import soup_helpers  # pylint: disable=g-import-not-at-top  # jax: not in the tiny command.
  from train import sharding  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("runs")
  mesh = sharding.make_mesh((("data", -1),))
  for name, classes in (("upstream", fashion_mnist.UPSTREAM_CLASSES),
                        ("downstream", fashion_mnist.DOWNSTREAM_CLASSES)):
    soup_helpers.save_orbax_run(root / name, {"ema_low": soup_helpers.random_tree(0)}, mesh)
    config = fashion_mnist.get_config("variant=mu/4")
    config.input.classes = classes
    run_dir.write_config(str(root / name), json.loads(config.to_json()))
  return root


# (mistake, module, args, what the FATAL line starts with); {tmp} and {runs} are filled in.
MISTAKES = [
    ("unknown config argument", "train",
     ["--config=configs/fashion_mnist.py:runlocal,varient=nano/4", "--workdir={tmp}/run"],
     "Flags parsing error: flag --config=configs/fashion_mnist.py:runlocal,varient=nano/4: "
     "unknown config argument 'varient'; known: ['init', 'runlocal', 'stage', 'variant']; "
     "did you mean 'variant'?"),
    ("bad config value", "train",
     ["--config=configs/fashion_mnist.py:runlocal", "--workdir={tmp}/run", "--config.lr=abc"],
     "Flags parsing error: flag --config.lr=abc: could not convert string to float: 'abc'"),
    ("config key typo", "train",
     ["--config=configs/fashion_mnist.py:runlocal", "--workdir={tmp}/run",
      "--config.optimizer.momentun=0.5"],
     "Flags parsing error: --config.optimizer.momentun: the config has no key 'momentun'; "
     "did you mean 'momentum'?"),
    ("missing weights", "eval", ["--weights={tmp}/missing.npz"],
     "checkpoint {tmp}/missing.npz does not exist"),
    ("unknown suite", "eval", ["--weights={tmp}/missing.npz", "--suite=imagenet_c"],
     "unknown --suite='imagenet_c'; known: ['heldout', 'test', 'fashion_mnist_shifts', "
     "'imagenet_shifts']"),
    ("incompatible ingredients", "soups",
     ["--ingredients={runs}/upstream,{runs}/downstream", "--soup_dir={tmp}/soup"],
     "config.input.classes differs between ingredients upstream ((0, 1, 4, 5, 8)) and "
     "downstream ((2, 3, 6, 7, 9))"),
    ("unknown recipe", "soups",
     ["--ingredients={runs}/upstream", "--soup_dir={tmp}/soup", "--recipes=uniform,soupy"],
     "--recipes=uniform,soupy: unknown recipes ['soupy']; known: ['uniform', 'greedy', "
     "'learned', 'learned_blocks', 'ensemble', 'greedy_ensemble', 'model_stock'"),
    ("not a sweep directory", "launch", ["status", "--sweep_dir={tmp}"],
     "{tmp}/manifest.json does not exist: is {tmp} a sweep directory written by "
     "`python -m launch`?"),
    ("no soups cooked", "soups.report", ["--soup_dir={tmp}"],
     "{tmp}/results.json does not exist; cook the soups first (python -m soups)"),
]


@pytest.mark.parametrize("module,args,expected", [m[1:] for m in MISTAKES],
                         ids=[m[0] for m in MISTAKES])
@pytest.mark.slow
def test_a_user_mistake_is_one_fatal_line_and_exit_status_2(request, tmp_path, module, args,
                                                            expected):
  runs_dir = request.getfixturevalue("runs") if module == "soups" else ""
  fill = lambda text: text.format(tmp=tmp_path, runs=runs_dir)
  proc = run_module(module, *map(fill, args), check=False, timeout=120)
  assert_one_fatal_line(proc, fill(expected))
  assert os.listdir(tmp_path) == []  # Refused before anything is written.


@pytest.mark.slow
def test_a_soup_shows_its_progress_and_no_library_info_lines(tmp_path, data_dir):
  """`python -m soups` on two small runs: a line per ingredient evaluated and per greedy
  candidate, each with its count, bar and ETA, and per recipe; JAX's backend probe ('Unable to
  initialize backend tpu'), TFDS's 'Load dataset info' and TensorFlow's start-up lines stay off
  the console."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from train import pretrained  # pylint: disable=g-import-not-at-top
  from train import trees  # pylint: disable=g-import-not-at-top
  from train import vit  # pylint: disable=g-import-not-at-top
  config = fashion_mnist.get_config("variant=mu/4")
  config.input.data_dir = data_dir
  model = vit.build_model(config.model, config.num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
  weights = []
  for name in ("a", "b"):
    weights.append(run_dir.exported_weights(str(tmp_path / name), "params"))
    pretrained.save_npz(weights[-1], {k: np.zeros(v.shape, v.dtype)
                                      for k, v in trees.flatten(shapes["params"]).items()})
    run_dir.write_config(str(tmp_path / name), json.loads(config.to_json()))
  proc = run_module("soups", f"--ingredients={','.join(weights)}", "--recipes=uniform,greedy",
                    f"--soup_dir={tmp_path}/soup", timeout=300)
  assert "[uniform] held-out" in proc.stdout
  lines = proc.stdout.splitlines()
  progress = [line for line in lines if re.match(
      r"\[soups\] (evaluating ingredient|greedy candidate) \d/2 \[#* *\] +\d+% \| ETA \d+m\d\ds \| ", line)]
  assert [line.split(" [#")[0].split(" [ ")[0] for line in progress] == [
      "[soups] evaluating ingredient 1/2", "[soups] evaluating ingredient 2/2",
      "[soups] greedy candidate 1/2", "[soups] greedy candidate 2/2"], proc.stdout
  assert "| b: held-out " in progress[1], progress[1]
  assert re.search(r"greedy candidate 2/2 \[#{20}\] 100% \| ETA 0m00s \| b: add \(soup with it", progress[3])
  assert "[soups] recipe 1/2: uniform: cooking from 2 ingredients" in lines
  assert any(line.startswith("[soups] recipe 2/2: greedy: held-out ") for line in lines)
  assert not INFO_LINE.search(proc.stderr), proc.stderr[-3000:]
  assert "Unable to initialize backend" not in proc.stderr


# The tiny command: python -m tests.test_cli --fail=<kind> [--config=<file>:<arg>].
def _tiny_command(argv):
  del argv
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.info("a library INFO line")
  logging.warning("a library WARNING line")
  print("[tiny] started", flush=True)
  kind = flags.FLAGS.fail
  if kind == "user":
    raise errors.UserError("config.lr=-1 must be > 0: pass --config.lr=<a positive float>")
  if kind == "missing":
    open("/nonexistent/weights.npz").close()  # pylint: disable=consider-using-with
  if kind == "usage":
    raise app.UsageError("give exactly one of --sweep_dir and --ingredients")
  if kind == "value":
    raise ValueError("a plain ValueError, as from deep inside a library")
  if kind == "bug":
    raise RuntimeError("a deliberate internal error")


# (case, args, exit status, what stderr's last line starts with, whether a traceback shows).
TINY = [
    ("user error", ["--fail=user"], 2, "FATAL config.lr=-1 must be > 0", False),
    ("user error --traceback", ["--fail=user", "--traceback"], 2,
     "FATAL config.lr=-1 must be > 0", True),
    ("missing file", ["--fail=missing"], 2,
     "FATAL [Errno 2] No such file or directory: '/nonexistent/weights.npz'", False),
    ("usage", ["--fail=usage"], 2, "FATAL give exactly one of --sweep_dir and --ingredients",
     False),
    ("unknown flag", ["--fail=user", "--nosuch=1"], 2,
     "FATAL Flags parsing error: Unknown command line flag 'nosuch'", False),
    ("config file error --traceback",
     ["--fail=bug", "--config=configs/fashion_mnist.py:varient=nano/4", "--traceback"], 2,
     "FATAL Flags parsing error: flag --config=configs/fashion_mnist.py:varient=nano/4: unknown "
     "config argument 'varient'", True),
    ("missing config file", ["--fail=bug", "--config=configs/nope.py", "--config.lr=1"], 2,
     "FATAL Flags parsing error: flag --config=configs/nope.py: no config file configs/nope.py",
     False),
    ("plain ValueError is a bug", ["--fail=value"], 1,
     "ValueError: a plain ValueError, as from deep inside a library", True),
    ("internal error", ["--fail=bug"], 1, "RuntimeError: a deliberate internal error", True),
]


@pytest.mark.parametrize("args,status,last_line,traceback", [t[1:] for t in TINY],
                         ids=[t[0] for t in TINY])
def test_user_mistakes_end_in_one_line_and_bugs_keep_their_traceback(args, status, last_line,
                                                                     traceback):
  proc = run_module("tests.test_cli", *args, check=False, timeout=60)
  lines = _lines(proc.stderr)
  assert proc.returncode == status, proc.stderr[-3000:]
  assert lines[-1].startswith(last_line), proc.stderr[-3000:]
  assert ("Traceback (most recent call last)" in proc.stderr) == traceback
  assert sum(line.startswith("FATAL") for line in lines) == (status == 2)
  if "--config=configs/fashion_mnist.py:varient=nano/4" in args:  # The config file's frame.
    assert 'configs/common.py", line' in proc.stderr and "in parse_arg" in proc.stderr


def test_verbosity_0_brings_library_info_lines_back():
  quiet = run_module("tests.test_cli", "--fail=none")
  assert "[tiny] started" in quiet.stdout
  assert "a library WARNING line" in quiet.stderr and "a library INFO line" not in quiet.stderr
  loud = run_module("tests.test_cli", "--fail=none", "--verbosity=0")
  assert INFO_LINE.search(loud.stderr) and "a library INFO line" in loud.stderr


def test_status_columns_are_as_wide_as_their_content():
  from launch import status  # pylint: disable=g-import-not-at-top
  rows = [status.HEADER,
          ("a-run-name-much-longer-than-the-others-lr0.003-3f9c2a1b", "done", "200/200", "",
           "81.23%"),
          ("lr0.1-1a2b3c4d", "interrupted", "51234/100000", "[#####     ]", ""),
          ("probe", "pending", "–", "", "")]
  lines = status.format_columns(rows, status.ALIGN)
  state_at = {line.index(row[1]) for line, row in zip(lines, rows)}
  assert len(state_at) == 1  # Every state starts in one column, after the longest name.
  step_ends = {line.index(row[2]) + len(row[2]) for line, row in zip(lines, rows)}
  assert len(step_ends) == 1  # Steps are right-aligned.
  assert lines[1].endswith("81.23%") and lines[2].endswith("]")
  assert lines[2].index("[") > max(step_ends)
  # No column of empty cells (no bar while nothing runs) and no trailing blanks.
  quiet = status.format_columns([r[:3] + ("",) + r[4:] for r in rows], status.ALIGN)
  assert quiet[0].endswith("step held-out") and all(line == line.rstrip() for line in quiet)


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("fail", "none", ["none", "user", "missing", "usage", "value", "bug"],
                    "What the tiny command does after its log lines.")
  config_flags.DEFINE_config_file("config", None, "A config file, as train's.")
  command.run(_tiny_command)
