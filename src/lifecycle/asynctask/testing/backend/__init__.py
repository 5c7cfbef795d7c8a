"""``BackendConformance``: the protocol-level rules every backend passes, one rule set per module."""
