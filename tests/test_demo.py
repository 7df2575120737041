"""`make demo`'s pipeline, scaled down: pre-train, sweep, soups and report, end to end."""

import json

import pytest

from tests.helpers import run_module


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path, data_dir):
  out = tmp_path / "demo"
  args = (f"--out={out}", "--size=small", "--pretrain_steps=200", "--finetune_steps=40",
          f"--data_dir={data_dir}")
  proc = run_module("launch.demo", *args, timeout=1500)
  for stage in ("[demo 1/3]", "[demo 2/3]", "[demo 3/3]"):
    assert stage in proc.stdout
  assert "ETA" in proc.stdout.split("[demo 2/3]")[1].splitlines()[0]
  assert (out / "pretrain" / "final" / "params.npz").exists()
  manifest = json.loads((out / "sweep" / "manifest.json").read_text())
  assert len(manifest["runs"]) == 4 and {r["status"] for r in manifest["runs"]} == {"done"}
  soup_dir = out / "soup"
  for name in ("results.json", "greedy_journal.jsonl", "report.md", "heldout_vs_test.png",
               "shift_vs_test.png", "greedy_progress.png"):
    assert (soup_dir / name).exists(), name
  results = json.loads((soup_dir / "results.json").read_text())
  assert set(results["soups"]) == {"uniform", "greedy", "learned", "ensemble"}
  best = max(i["heldout_acc"] for i in results["ingredients"])
  assert results["soups"]["greedy"]["heldout_acc"] >= best
  for row in results["ingredients"] + list(results["soups"].values()):
    assert set(row["shift_acc"]) == {"noise", "blur", "contrast", "rotate", "invert"}
    assert all(0 <= v <= 1 for v in [row["heldout_acc"], row["test_acc"], *row["shift_acc"].values()])
  assert [p["alpha"] for p in results["wise_ft"]["points"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
  report = (soup_dir / "report.md").read_text()
  assert "| model | held-out % | test % |" in report and "shift avg %" in report
  for label in ("uniform soup", "greedy soup", "learned soup", "ensemble"):
    assert label in report
  # Re-running continues from what is there: nothing is trained or cooked again.
  again = run_module("launch.demo", *args, timeout=600)
  assert "0 to run" in again.stdout
  assert json.loads((soup_dir / "results.json").read_text()) == results
