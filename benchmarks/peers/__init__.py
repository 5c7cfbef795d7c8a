"""One adapter module per library, each run as ``python -m benchmarks.peers.<name>`` in its own venv."""
