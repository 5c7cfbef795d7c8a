"""``EngineConformance``: ``AsyncTasks`` end to end over a backend, one rule set per module."""
