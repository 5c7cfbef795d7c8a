"""A reusable multi-process harness for durability tests: worker processes, their output, kill -9.

``worker.py`` (run by path, or as ``python -m tests.asynctask.procs.worker`` from the repository root) runs
``AsyncTasks`` on a backend URL under a ``TaskManager`` with ``lifecycle.run`` and prints one JSON object per
line (``{"event": "ready"}``, ``{"event": "started", "key": ...}``, ``{"event": "ran", "key": ...}``). The
test functions it registers live in ``jobs.py``; every completed run is also appended to ``runs.log`` in the
worker's output directory (one ``O_APPEND`` write per run), so a test can count runs even of a worker that was
killed.
"""

from ._harness import Event, Worker, Workers, read_runs

__all__ = ["Event", "Worker", "Workers", "read_runs"]
