"""Experiments: each module is a `get_config()` plus a short main, run as
`python -m experiments.<name> [--workdir=DIR] [--config.KEY=VALUE ...]`."""
