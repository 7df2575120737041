"""report.md and plots: numbers from results.json and direct evaluation; every plot drawn."""

import json

import jax
import numpy as np
from PIL import Image
import pytest

from soups import report
from soups import soup_dir as soup_dir_lib
from tests.eval_helpers import direct_logits
from tests.eval_helpers import eval_setup
from tests.eval_helpers import stored_run_config
from tests.eval_helpers import top1
from tests.helpers import run_module


def _table(text):
  """{row label: [cells]} of the report's first table."""
  rows = {}
  for line in text.split("\n\n| model |")[1].split("\n\n")[0].splitlines()[2:]:
    label, *cells = [c.strip() for c in line.strip("|").split("|")]
    rows[label.strip("*")] = cells
  return rows


def _check_plot(path):
  assert path.stat().st_size > 10_000, path.name
  with Image.open(path) as image:
    pixels = np.asarray(image.convert("L"))
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50, path.name
  assert np.mean(pixels < 250) > 0.03, path.name  # Not blank: axes, text and markers drawn.


# The uniform average of weight sets, one compiled function per number of members.
_average = jax.jit(lambda members: jax.tree.map(lambda *leaves: sum(leaves) / len(leaves), *members))


def _cook(evaluators, ingredients, datasets):
  """results.json and journal of a small greedy/uniform/ensemble cook, every number measured."""
  accuracy = {name: evaluators.make("accuracy", d) for name, d in datasets.items()}
  ensemble = {name: evaluators.make("ensemble", d) for name, d in datasets.items()}

  def scores(evaluate, members):
    result = {name: evaluate[name].evaluate(members)["accuracy"] for name in datasets}
    return {"heldout_acc": result.pop("heldout"), "test_acc": result.pop("test"),
            "shift_acc": result}

  rows = {name: scores(accuracy, p) for name, p in ingredients.items()}
  order = sorted(rows, key=lambda n: -rows[n]["heldout_acc"])
  selected, best, journal = [], -1.0, []
  for name in order:  # The paper's greedy soup, written out.
    tried = accuracy["heldout"].evaluate(_average([ingredients[n] for n in selected + [name]]))
    keep = tried["accuracy"] >= best
    journal.append({"name": name, "heldout_acc": rows[name]["heldout_acc"],
                    "soup_heldout_acc": tried["accuracy"], "decision": "add" if keep else "skip"})
    if keep:
      selected, best = selected + [name], tried["accuracy"]
  everyone = [ingredients[n] for n in order]
  greedy = _average([ingredients[n] for n in selected])
  soups = {"uniform": {**scores(accuracy, _average(everyone)), "ingredients": order},
           "greedy": {**scores(accuracy, greedy), "ingredients": selected},
           "ensemble": {**scores(ensemble, everyone), "ingredients": order}}
  return {"ingredients": [{"name": n, **rows[n]} for n in ingredients], "soups": soups}, journal


@pytest.mark.slow
def test_report_matches_results_and_direct_evaluation(data_dir, tmp_path):
  config = stored_run_config(tmp_path, **{"input.data_dir": data_dir})
  model, evaluators, params = eval_setup(config, batch_size=256, seeds=(0, 5))
  ingredients = {f"run{i}": p for i, p in enumerate(params)}
  shifted = evaluators.suite_datasets("fashion_mnist_shifts", "test[:400]")
  datasets = {"heldout": evaluators.run_split("heldout", "train[54000:54400]"),
              "test": evaluators.run_split("test", "test[:400]"),
              "noise": shifted["noise"], "invert": shifted["invert"]}
  results, journal = _cook(evaluators, ingredients, datasets)
  (tmp_path / "results.json").write_text(json.dumps(results))
  (tmp_path / "greedy_journal.jsonl").write_text("".join(json.dumps(e) + "\n" for e in journal))

  path = report.write_report(str(tmp_path))
  text = open(path).read()
  rows = _table(text)
  assert list(rows) == ["run0", "run1", "uniform soup", "greedy soup", "ensemble (2× cost)"]
  for label, row in [(i["name"], i) for i in results["ingredients"]] + [
      ("uniform soup", results["soups"]["uniform"]), ("greedy soup", results["soups"]["greedy"]),
      ("ensemble (2× cost)", results["soups"]["ensemble"])]:
    shift = row["shift_acc"]
    expected = [row["heldout_acc"], row["test_acc"], shift["invert"], shift["noise"],
                (shift["invert"] + shift["noise"]) / 2]
    assert rows[label] == [f"{100 * x:.2f}" for x in expected], label
  # The ensemble's and the uniform soup's test accuracy, recomputed from logits in numpy.
  logits = [direct_logits(model, p, datasets["test"]) for p in params]
  labels = logits[0][1]
  mean_logits = np.mean([member for member, _ in logits], axis=0)
  assert rows["ensemble (2× cost)"][1] == f"{100 * top1(mean_logits, labels):.2f}"
  uniform = _average(params)
  uniform_logits, _ = direct_logits(model, uniform, datasets["test"])
  assert rows["uniform soup"][1] == f"{100 * top1(uniform_logits, labels):.2f}"
  # The greedy search, step by step.
  for i, entry in enumerate(journal, 1):
    assert (f"| {i} | {entry['name']} | {100 * entry['heldout_acc']:.2f} | "
            f"{100 * entry['soup_heldout_acc']:.2f} | {entry['decision']} |") in text
  assert results["soups"]["greedy"]["heldout_acc"] >= max(
      i["heldout_acc"] for i in results["ingredients"])
  for plot in report.PLOTS:
    _check_plot(tmp_path / plot)


def test_report_without_shifts_or_journal_and_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"results.json does not exist; cook the soups"):
    report.write_report(str(tmp_path))
  results = {"ingredients": [{"name": "a", "heldout_acc": 0.5, "test_acc": 0.4, "shift_acc": {}}],
             "soups": {"uniform": {"heldout_acc": 0.6, "test_acc": 0.55, "shift_acc": {},
                                   "ingredients": ["a"]}}}
  (tmp_path / "results.json").write_text(json.dumps(results))
  text = open(report.write_report(str(tmp_path))).read()
  assert "shift avg" not in text and "Greedy search" not in text
  assert _table(text) == {"a": ["50.00", "40.00"], "uniform soup": ["60.00", "55.00"]}
  assert not (tmp_path / "greedy_progress.png").exists()
  _check_plot(tmp_path / "shift_vs_test.png")  # Says "not measured".
  entry = {"name": "a", "heldout_acc": 0.5, "soup_heldout_acc": 0.5, "decision": "add"}
  (tmp_path / "greedy_journal.jsonl").write_text(json.dumps(entry) + '\n{"name": "b", "hel')
  assert soup_dir_lib.read_journal(str(tmp_path)) == [entry]  # A torn last line: an interrupted step.
  (tmp_path / "greedy_journal.jsonl").write_text('{"name": "b", "hel\n' + json.dumps(entry))
  with pytest.raises(ValueError, match=r"greedy_journal.jsonl: line 1 is not JSON"):
    soup_dir_lib.read_journal(str(tmp_path))


@pytest.mark.slow
def test_report_cli_writes_the_report(tmp_path):
  results = {"ingredients": [{"name": n, "heldout_acc": h, "test_acc": h - 0.01,
                              "shift_acc": {"noise": h - 0.2}}
                             for n, h in [("a", 0.8), ("b", 0.7)]],
             "soups": {"greedy": {"heldout_acc": 0.82, "test_acc": 0.81,
                                  "shift_acc": {"noise": 0.65}, "ingredients": ["a", "b"]}}}
  (tmp_path / "results.json").write_text(json.dumps(results))
  journal = [{"name": "a", "heldout_acc": 0.8, "soup_heldout_acc": 0.8, "decision": "add"},
             {"name": "b", "heldout_acc": 0.7, "soup_heldout_acc": 0.82, "decision": "add"}]
  (tmp_path / "greedy_journal.jsonl").write_text("".join(json.dumps(e) + "\n" for e in journal))
  proc = run_module("soups.report", f"--soup_dir={tmp_path}")
  assert f"wrote {tmp_path / 'report.md'}" in proc.stdout
  assert _table((tmp_path / "report.md").read_text())["greedy soup"] == [
      "82.00", "81.00", "65.00", "65.00"]
  for plot in report.PLOTS:
    _check_plot(tmp_path / plot)
