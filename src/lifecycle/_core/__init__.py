"""The core: the TaskManager and what it needs (task protocols, errors, events, restarts, readiness,
the stuck-shutdown report, systemd). It imports anyio and the bottom modules (``_compat``, ``_checks``,
``_redact``) only: never the CLI, rich, ``lifecycle.tasks`` or ``lifecycle.asynctask``."""
