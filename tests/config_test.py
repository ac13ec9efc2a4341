"""Config overrides: typed, checked, and loud about mistakes."""

import pytest

import jdl
from jdl import config as config_lib


def test_overrides_are_typed_by_the_existing_value():
  """Ints, floats, bools, tuples, strings and unset fields parse from their text."""
  config = config_lib.apply_overrides(config_lib.base_config(), [
      "num_epochs=3", "optimizer.learning_rate=3e-4", "progress=false", "model.mlp.hidden=(256, 64)",
      "dataset=fashion_mnist", "data_dir=/data/tfds", "optimizer.clip_norm=1.0", "top_k=5",
  ])
  assert config.num_epochs == 3
  assert config.optimizer.learning_rate == pytest.approx(3e-4)
  assert config.progress is False
  assert config.model.mlp.hidden == (256, 64)
  assert config.dataset == "fashion_mnist"
  assert config.data_dir == "/data/tfds"
  assert config.optimizer.clip_norm == 1.0
  assert config.top_k == (5,)


def test_none_unsets_an_optional_field():
  """`KEY=None` unsets a field (a norm, a clip norm), and the field takes values again after."""
  config = config_lib.apply_overrides(config_lib.base_config(), [
      "optimizer.clip_norm=1.0", "optimizer.clip_norm=None", "data_dir=None"])
  assert config.optimizer.clip_norm is None and config.data_dir is None
  assert config_lib.apply_overrides(config, ["data_dir=/d"]).data_dir == "/d"


@pytest.mark.parametrize("overrides, message", [
    (["augment.where=gpu"], "unknown config.augment.where 'gpu'"),
    (["augment.flip=true", "augment.where=pipeline"], "needs in_memory=False"),
    (["augment.cutout_size=-2"], "cutout_size=-2 must be an integer >= 0"),
])
def test_augmentation_mistakes_fail_before_any_data_is_read(overrides, message, tmp_path):
  """A bad augmentation config stops `train_and_evaluate` at once with a message naming it."""
  config = config_lib.apply_overrides(config_lib.base_config(), [
      *overrides, f"data_dir={tmp_path / 'missing'}", "download=false"])
  with pytest.raises(ValueError, match=message):
    jdl.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_overrides_do_not_touch_the_original():
  """apply_overrides works on a copy."""
  base = config_lib.base_config()
  config_lib.apply_overrides(base, ["num_epochs=99"])
  assert base.num_epochs == 10


@pytest.mark.parametrize(
    "override, message",
    [
        ("num_epoch=3", r"unknown config key 'num_epoch'. Did you mean 'num_epochs'\?"),
        ("optimizer.learnig_rate=0.1", "Did you mean 'optimizer.learning_rate'"),
        ("batch_size=abc", "batch_size"),
        ("progress=maybe", "is a bool"),
        ("optimizer=adam", "is a group"),
        ("num_epochs", "KEY=VALUE"),
    ],
)
def test_mistakes_are_errors_that_name_the_key(override, message):
  """A misspelt key or a wrong type is a ConfigError, never a silent default."""
  with pytest.raises(jdl.ConfigError, match=message):
    config_lib.apply_overrides(config_lib.base_config(), [override])


def test_command_line_parsing():
  """--workdir and --config.* are read; anything else is an error."""
  config, workdir = config_lib.parse_command_line(
      config_lib.base_config(), ["--workdir=/tmp/x", "--config.seed=4"],
      name="demo", default_workdir="runs/demo")
  assert workdir == "/tmp/x" and config.seed == 4
  with pytest.raises(jdl.ConfigError, match="unexpected argument"):
    config_lib.parse_command_line(config_lib.base_config(), ["--epochs=3"],
                                  name="demo", default_workdir="runs/demo")


def test_every_key_of_the_base_config_is_commented():
  """The base config declares and comments every key (the source line has a # comment)."""
  import inspect  # pylint: disable=import-outside-toplevel

  source = inspect.getsource(config_lib.base_config)
  for line in source.splitlines():
    stripped = line.strip()
    if stripped.startswith("config.") and "=" in stripped and "ConfigDict()" not in stripped:
      assert "#" in stripped, f"uncommented config key: {stripped}"
