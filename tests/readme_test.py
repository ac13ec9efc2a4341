"""The README's promises: its Python example runs and learns, and CI runs its two commands."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language):
  return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_python_examples_run_and_learn(capsys):
  """Every Python block of the README executes as written, each after the ones before it (as a
  reader runs them, in one session); the one that prints metrics (the 'own loop' example)
  reaches high accuracy on its toy task."""
  examples = _blocks("python")
  assert examples, "README.md has no ```python example"
  accuracies, namespace = [], {}
  for index, example in enumerate(examples):
    exec(compile(example, f"README.md python block {index}", "exec"), namespace)  # pylint: disable=exec-used
    accuracies += [float(a) for a in re.findall(r"'accuracy': ([0-9.]+)", capsys.readouterr().out)]
  assert accuracies and max(accuracies) > 0.9, accuracies


def test_ci_runs_the_readme_install_and_test_commands():
  """.ci/run contains, verbatim, the README's command that installs jdl and the one that runs the
  tests."""
  commands = [line.strip() for block in _blocks("bash") for line in block.splitlines()]
  install = [c for c in commands if "pip install" in c]
  test = [c for c in commands if "pytest" in c]
  assert install and test, "README.md shows no install or test command in a ```bash block"
  ci = (ROOT / ".ci" / "run").read_text()
  for command in install + test:
    assert command in ci, command
