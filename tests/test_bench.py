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
    for kind in ("raw", "numpy", "stockpot", "cached"):
      assert row[kind]["seconds"] > 0 and row[kind]["peak_rss_mb"] > 0, (fmt, kind)
    for kind in ("numpy", "stockpot", "cached"):
      assert row[f"{kind}_fraction_of_raw_read"] == pytest.approx(
          row["raw"]["seconds"] / row[kind]["seconds"]), (fmt, kind)
    for kind in ("stockpot", "cached"):
      assert 0 <= row[kind]["check_seconds"] < row[kind]["seconds"], (fmt, kind)
    # Each worker's own peak, not the bench process's (which imported JAX to write the
    # ingredients): the raw read holds one 16 MiB chunk (about 50 MB in all), stockpot
    # the JAX runtime.
    assert row["raw"]["peak_rss_mb"] < min(120, row["stockpot"]["peak_rss_mb"] / 2), row


@pytest.mark.slow
def test_step_profile_names_every_part_of_the_vit_and_adds_up(tmp_path):
  out = tmp_path / "profile.json"
  run_module("bench.profile_step", "--variant=pico/7", "--steps=2", f"--out={out}", timeout=600)
  result = json.loads(out.read_text())
  rows = {(row["part"], row["pass"]): row for row in result["rows"]}
  for part in ("MLP Dense_0, Dense_1 (matmul, bias)", "attention scores, softmax, values",
               "attention query/key/value/out (matmul, bias)", "LayerNorms"):
    for direction in ("forward", "backward"):
      assert rows[part, direction]["ms_per_step"] > 0, (part, direction)
  assert rows["patch embedding", "forward"]["ms_per_step"] > 0
  assert rows["loss, optimizer, EMAs, norms", ""]["ms_per_step"] > 0
  assert sum(row["share"] for row in result["rows"]) == pytest.approx(1.0, abs=1e-6)
  assert sum(row["ms_per_step"] for row in result["rows"]) == pytest.approx(
      result["traced_ms_per_step"], rel=1e-6)
