"""Shared fixtures: 8 fake CPU devices, the prepared Fashion-MNIST, a pre-trained tiny ViT."""

import os
import shutil
import tempfile

# Before jax is imported anywhere: in-process tests see 8 CPU devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent XLA compilation cache for the session, inherited by every
# `python -m ...` the tests start: the same train and eval steps are compiled
# by dozens of runs, and a cache hit returns the same executable.
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="stockpot-tests-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # pylint: disable=g-import-not-at-top

from tests.helpers import run_module  # pylint: disable=g-import-not-at-top


def pytest_sessionfinish(session):
  worker_output = getattr(session.config, "workeroutput", None)
  if worker_output is not None:  # A pytest-xdist worker: hand its tally to the controller.
    worker_output["reliability"] = _RELIABILITY.to_dict()
  if _XLA_CACHE:  # Only in the process that made it (the controller under xdist).
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)  # Known to pytest only with pytest-xdist loaded.
def pytest_testnodedown(node, error):
  """pytest-xdist: adds a finished worker's reliability tally to this (the controller's)."""
  del error
  _RELIABILITY.merge(getattr(node, "workeroutput", {}).get("reliability"))


@pytest.fixture(scope="session")
def data_dir():
  """TFDS data dir holding fashion_mnist, built offline from the Debian files if needed."""
  from train import packaged_data  # pylint: disable=g-import-not-at-top
  builder = packaged_data.prepare_fashion_mnist(os.environ.get("TFDS_DATA_DIR") or None)
  return str(builder.data_dir_root)


@pytest.fixture(scope="session")
def pretrained_npz(tmp_path_factory, data_dir):
  """A pico/7 ViT (the config default) pre-trained on the upstream Fashion-MNIST classes, exported to .npz."""
  workdir = tmp_path_factory.mktemp("upstream")
  run_module("train", "--config=configs/fashion_mnist.py:stage=pretrain",
             f"--workdir={workdir}", f"--config.input.data_dir={data_dir}",
             "--config.total_steps=300", "--config.log_every_steps=100",
             "--config.final_eval_weights=('params',)")
  return os.path.join(workdir, "final", "params.npz")


class Reliability:
  """Faults injected and survived, and bad inputs tried, as the fault tests report them."""

  def __init__(self):
    self.faults = {}  # kind -> [injected, survived]
    self.bad_inputs = []  # (kind, error message excerpt)

  def record(self, kind, injected, survived):
    totals = self.faults.setdefault(kind, [0, 0])
    totals[0] += injected
    totals[1] += survived

  def bad_input(self, kind, message):
    self.bad_inputs.append((kind, message))

  def to_dict(self):
    return {"faults": self.faults, "bad_inputs": self.bad_inputs}

  def merge(self, tally):
    """Adds another process's `to_dict()` (None: nothing) to this one."""
    for kind, (injected, survived) in (tally or {}).get("faults", {}).items():
      self.record(kind, injected, survived)
    self.bad_inputs.extend(tuple(item) for item in (tally or {}).get("bad_inputs", []))


_RELIABILITY = Reliability()


@pytest.fixture
def reliability():
  return _RELIABILITY


def pytest_terminal_summary(terminalreporter):
  """The reliability section of README.md is this summary, copied from a `make test` run."""
  if not (_RELIABILITY.faults or _RELIABILITY.bad_inputs):
    return
  write = terminalreporter.write_line
  terminalreporter.section("reliability")
  for kind, (injected, survived) in _RELIABILITY.faults.items():
    write(f"{kind}: {injected} injected, {survived} survived")
  injected = sum(v[0] for v in _RELIABILITY.faults.values())
  survived = sum(v[1] for v in _RELIABILITY.faults.values())
  write(f"faults: {injected} injected, {survived} survived; bad inputs: "
        f"{len(_RELIABILITY.bad_inputs)} tried, each a clear error")
