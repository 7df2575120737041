"""The soup step across processes joined by jax.distributed: the same soups as one process,
and a clear, prompt error when a process dies."""

import os
import signal
import time

import pytest

from tests.helpers import free_port
from tests.helpers import run_module
from tests.helpers import start_processes

pytestmark = pytest.mark.slow

SOUPS = ("--weights=params", "--recipes=uniform,greedy,learned", "--learned_epochs=1",
         "--greedy_early_abort")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, data_dir):
  root = tmp_path_factory.mktemp("multihost")
  (root / "sweep.py").write_text(
      "def get_config(arg=None):\n"
      "  return {'base': 'configs/fashion_mnist.py:stage=pretrain,runlocal,variant=mu/4',\n"
      f"          'common': {{'input.data_dir': {data_dir!r}, 'total_steps': 20,\n"
      "                      'final_eval_weights': ('params',)},\n"
      "          'grid': [{'lr': 0.001}, {'lr': 0.003}, {'lr': 0.01}]}\n")
  run_module("launch", f"--sweep={root / 'sweep.py'}", f"--sweep_dir={root / 'sweep'}",
             "--parallel=2")
  return root / "sweep"


def test_two_processes_cook_the_same_soups_as_one(sweep_dir, tmp_path):
  """Uniform, greedy (its early abort taken) and learned soups by two processes of one
  device each equal, byte for byte, one process's on two devices: weights, journal,
  results.json; both processes end with the same soups."""
  run_module("soups", f"--sweep_dir={sweep_dir}", *SOUPS, f"--soup_dir={tmp_path / 'one'}",
             devices=2)
  procs = start_processes("soups", [f"--sweep_dir={sweep_dir}", *SOUPS,
                                    f"--soup_dir={tmp_path / 'two'}"], 2, free_port())
  outputs = [p.communicate(timeout=600) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]
  for name in ("results.json", "greedy_journal.jsonl", "evaluations.json", "uniform/params.npz",
               "greedy/params.npz", "learned/params.npz"):
    assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
  assert '"batches_evaluated": 3' in (tmp_path / "one" / "greedy_journal.jsonl").read_text()
  finals = [[line for line in out.splitlines() if line.startswith(("[uniform]", "[greedy]",
                                                                    "[learned]"))]
            for out, _ in outputs]
  assert len(finals[0]) == 3 and finals[0] == finals[1]  # The same decisions in each process.
  assert "[soups] evaluating ingredient" in outputs[0][0]  # Progress: process 0 only.
  assert "[soups] evaluating" not in outputs[1][0]


def test_a_killed_process_stops_the_other_promptly_naming_the_lost_process(sweep_dir, tmp_path):
  procs = start_processes("soups", [f"--sweep_dir={sweep_dir}", *SOUPS,
                                    f"--soup_dir={tmp_path / 'soup'}", "--heartbeat_timeout=10"],
                          2, free_port())
  try:
    deadline = time.monotonic() + 300
    line = ""
    while "[soups] evaluating ingredient 1/3" not in line:  # Process 0's first progress line.
      assert time.monotonic() < deadline and procs[0].poll() is None, line
      line = procs[0].stdout.readline()
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    _, err = procs[0].communicate(timeout=120)
    assert time.monotonic() - killed_at < 60
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
  # In a collective, the Gloo error is ours to report: one FATAL line, exit status 3.
  # Elsewhere, JAX's coordination service ends the process after --heartbeat_timeout.
  fatal = [line for line in err.splitlines() if line.startswith("FATAL")]
  if procs[0].returncode == 3:
    assert len(fatal) == 1 and "another process of this multi-process job is gone" in fatal[0]
    assert "start the same command on every host again: it resumes" in fatal[0]
  else:
    assert procs[0].returncode == -signal.SIGABRT, err[-3000:]
    assert "Task 1 heartbeat timeout" in err and "another task died" in err
