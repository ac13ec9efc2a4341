"""Benchmarks and profiles of jdl against plain flax+optax programs (and Keras), each runnable as
`python -m benchmarks.<name>` from the repository root; each module's docstring holds its command.

They are not part of the library (`pip install jdl` does not install them): they measure it.
"""
