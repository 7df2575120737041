"""The benchmarks still run against today's code: each writes the results it promises."""

import json

import pytest

from tests.helpers import run_module


@pytest.mark.slow
def test_soup_step_bench_measures_every_kind_for_every_format(tmp_path):
  out = tmp_path / "soup_step.json"
  run_module("bench.soup_step", "--variant=pico/7", "--counts=2", "--caches=warm",
             "--repeats=1", "--devices=2", f"--data_dir={tmp_path / 'ingredients'}",
             f"--out={out}", timeout=600)
  result = json.loads(out.read_text())
  rows = {row["format"]: row for row in result["rows"]}
  assert sorted(rows) == ["npz", "orbax"] and result["devices"] == 2
  for fmt, row in rows.items():
    assert row["n"] == 2 and row["cache"] == "warm", fmt
    assert row["bytes"] > 2 * 0.5 * result["model_mb"] * 2**20, fmt  # orbax compresses a little.
    for kind in ("raw", "numpy", "stockpot"):
      assert row[kind]["seconds"] > 0 and row[kind]["peak_rss_mb"] > 0, (fmt, kind)
    for kind in ("numpy", "stockpot"):
      assert row[f"{kind}_fraction_of_raw_read"] == pytest.approx(
          row["raw"]["seconds"] / row[kind]["seconds"]), (fmt, kind)
    assert 0 <= row["stockpot"]["check_seconds"] < row["stockpot"]["seconds"], fmt
