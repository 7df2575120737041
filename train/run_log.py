"""What a run tells its researcher: TensorBoard + `metrics.jsonl`, and a console progress bar.

Only process 0 writes; the other processes get a writer that drops everything.
"""

import contextlib
import json
import logging
import os
import sys
import time

from absl import logging as absl_logging
from clu import metric_writers
import jax

from train import durations
from train import files
from train import run_dir


class JsonlWriter(metric_writers.MetricWriter):
  """Appends `{"step": s, name: value, ...}` lines to a file: easy to read from any script.

  On resume, lines of steps after the restored checkpoint (written before a
  kill) are dropped first, so the file reads as one uninterrupted run.
  """

  def __init__(self, path, resume_step=0):
    self.path = path
    if os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      files.write_bytes_atomic(path, "".join(kept).encode())
    self._file = open(path, "a")  # pylint: disable=consider-using-with

  def write_scalars(self, step, scalars):
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def write_hparams(self, hparams):
    del hparams  # The resolved config is written to config.json instead.

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata  # Scalars only; tensors go to TensorBoard.

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


class _DropLibraryInfo(logging.Filter):
  """Drops INFO records from orbax and TensorStore, which log every file they touch."""

  def filter(self, record):
    return record.levelno > logging.INFO or not any(
        part in record.pathname for part in ("/orbax/", "/tensorstore/"))


def quiet_library_logs():
  """Keeps the console for the progress bar and our own messages."""
  absl_logging.get_absl_handler().addFilter(_DropLibraryInfo())


def make_writer(workdir, resume_step=0):
  """TensorBoard (`<workdir>/tensorboard`) and `<workdir>/metrics.jsonl` on process 0."""
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  return metric_writers.MultiWriter([
      metric_writers.SummaryWriter(run_dir.tensorboard_dir(workdir)),
      JsonlWriter(run_dir.metrics_path(workdir), resume_step),
  ])


class Progress:
  """Console progress: step, bar, images/s and ETA, from the loop's own clock.

  As big_vision's Chrono, the clock starts after the first step (compilation)
  and stops while `paused()` (evaluation, checkpoint waits), so images/s is the
  training throughput. On a terminal the line redraws in place; in a log it
  is one line per report.
  """

  def __init__(self, total_steps, first_step, global_batch, name="train",
               out=None, enabled=None):
    self.total_steps, self.global_batch, self.name = total_steps, global_batch, name
    self.out = out or sys.stdout
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._t0 = None
    self._step0 = first_step
    self._paused = 0.0

  def start_clock(self, step):
    """Call once the first step has finished: throughput counts from here."""
    self._t0, self._step0, self._paused = time.monotonic(), step, 0.0

  @contextlib.contextmanager
  def paused(self):
    start = time.monotonic()
    try:
      yield
    finally:
      self._paused += time.monotonic() - start

  def rates(self, step):
    """{'img_per_sec', 'steps_per_sec', 'eta_sec'} since the clock started (empty before)."""
    if self._t0 is None or step <= self._step0:
      return {}
    active = max(time.monotonic() - self._t0 - self._paused, 1e-9)
    steps_per_sec = (step - self._step0) / active
    return {"img_per_sec": steps_per_sec * self.global_batch, "steps_per_sec": steps_per_sec,
            "eta_sec": (self.total_steps - step) / steps_per_sec}

  def report(self, step, metrics):
    """Prints one progress line with `metrics` (name -> float)."""
    if not self.enabled:
      return
    rates = self.rates(step)
    done = step / self.total_steps
    bar = "#" * int(done * 20)
    line = f"[{self.name}] step {step}/{self.total_steps} [{bar:<20}] {done:4.0%}"
    if rates:
      line += (f" | {rates['img_per_sec']:.0f} img/s | "
               f"ETA {durations.format_duration(rates['eta_sec'])}")
    line += "".join(f" | {k} {v:.4g}" for k, v in metrics.items())
    terminal = self.out.isatty()
    end = "\n" if not terminal or step >= self.total_steps else ""
    self.out.write(("\r\033[K" if terminal else "") + line + end)
    self.out.flush()


class CountProgress:
  """Console progress over a known number of items (ingredients, candidates): bar and ETA.

  The ETA is the mean time per item so far times the items left, so it
  counts compiles and reads as they come; every line is printed whole, as
  the soup step's lines also go to logs.
  """

  def __init__(self, name, what, total, out=None, enabled=None):
    self.name, self.what, self.total = name, what, total
    self.out = out or sys.stdout
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.done, self._t0 = 0, time.monotonic()

  def advance(self, text=""):
    """Counts one item done and prints `[name] what i/N [bar] pct | ETA | text`."""
    self.done += 1
    if not self.enabled:
      return
    fraction = self.done / self.total if self.total else 1.0
    left = (time.monotonic() - self._t0) / self.done * (self.total - self.done)
    line = (f"[{self.name}] {self.what} {self.done}/{self.total} [{'#' * int(fraction * 20):<20}]"
            f" {fraction:4.0%} | ETA {durations.format_duration(left)}")
    self.out.write(line + (f" | {text}" if text else "") + "\n")
    self.out.flush()
