"""The README's promises: its Python example runs and CI runs its commands."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language):
  return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_python_example_runs_and_learns(capsys):
  """The 'own loop' example executes as written and reaches high accuracy on its toy task."""
  (example,) = _blocks("python")
  exec(compile(example, "README.md", "exec"), {})  # pylint: disable=exec-used
  printed = capsys.readouterr().out
  accuracy = float(re.search(r"'accuracy': ([0-9.]+)", printed).group(1))
  assert accuracy > 0.9


def test_ci_runs_the_readme_install_and_test_commands():
  """.ci/run contains the README's install-and-run command and its test command verbatim."""
  install, test = _blocks("bash")[:2]
  ci = (ROOT / ".ci" / "run").read_text()
  assert install.strip() in ci
  assert test.strip() in ci
