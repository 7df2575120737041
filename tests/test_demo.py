"""`make demo`'s pipeline, scaled down: pre-train, probe and sweep, soups, diagnostics, end to end."""

import json
import shutil

import pytest

from tests.helpers import run_module


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path, data_dir):
  out = tmp_path / "demo"
  args = (f"--out={out}", "--size=small", "--pretrain_steps=200", "--finetune_steps=40",
          f"--data_dir={data_dir}")
  proc = run_module("launch.demo", *args, timeout=1500)
  for stage in ("[demo 1/4]", "[demo 2/4]", "[demo 3/4]", "[demo 4/4]"):
    assert stage in proc.stdout
  assert "ETA" in proc.stdout.split("[demo 2/4]")[1].splitlines()[0]
  assert (out / "pretrain" / "final" / "params.npz").exists()
  manifest = json.loads((out / "sweep" / "manifest.json").read_text())
  assert len(manifest["runs"]) == 4 and {r["status"] for r in manifest["runs"]} == {"done"}
  # LP-FT: every run starts from the sweep's linear probe of the pre-trained model.
  assert manifest["start"]["name"] == "linear_probe" and manifest["start"]["status"] == "done"
  probe = out / "sweep" / "linear_probe" / "final" / "params.npz"
  for run in manifest["runs"]:
    assert json.loads((out / "sweep" / run["workdir"] / "config.json").read_text())[
        "model_init"] == str(probe)
  soup_dir = out / "soup"
  for name in ("results.json", "greedy_journal.jsonl", "report.md", "heldout_vs_test.png",
               "shift_vs_test.png", "greedy_progress.png", "diagnostics.json",
               "diagnostics_angles.png", "diagnostics_landscape.png"):
    assert (soup_dir / name).exists(), name
  results = json.loads((soup_dir / "results.json").read_text())
  assert set(results["soups"]) == {"uniform", "greedy", "learned", "ensemble"}
  best = max(i["heldout_acc"] for i in results["ingredients"])
  assert results["soups"]["greedy"]["heldout_acc"] >= best
  for row in results["ingredients"] + list(results["soups"].values()):
    assert set(row["shift_acc"]) == {"noise", "blur", "contrast", "rotate", "invert"}
    assert all(0 <= v <= 1 for v in [row["heldout_acc"], row["test_acc"], *row["shift_acc"].values()])
  assert [p["alpha"] for p in results["wise_ft"]["points"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
  assert results["warnings"] == []  # One init, one head init, one loss.
  # WiSE-FT's α = 0 end is the probe: a model of the downstream classes, not the upstream head.
  assert results["wise_ft"]["points"][0]["heldout_acc"] > 0.6
  report = (soup_dir / "report.md").read_text()
  assert "| model | held-out % | test % |" in report and "shift avg %" in report
  for label in ("uniform soup", "greedy soup", "learned soup", "ensemble",
                "## Diagnostics (held-out split)", "diagnostics_landscape.png"):
    assert label in report
  assert proc.stdout.index("started linear_probe") < proc.stdout.index("started lr")
  # Re-running continues from what is there. Here the probe was interrupted after its last
  # checkpoint, before its export: it alone resumes, to the same bytes; nothing else re-runs.
  exported = probe.read_bytes()
  (out / "sweep" / "linear_probe" / "results.json").unlink()
  shutil.rmtree(out / "sweep" / "linear_probe" / "final")
  again = run_module("launch.demo", *args, timeout=600)
  assert "start run linear_probe" in again.stdout and "started linear_probe" in again.stdout
  assert "0 to run" in again.stdout and "started lr" not in again.stdout
  assert probe.read_bytes() == exported
  assert json.loads((soup_dir / "results.json").read_text()) == results
