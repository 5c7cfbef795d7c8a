"""The worker engine: claim batches, run each task under its deadline, settle verdicts in batches, renew
leases, recover the tasks of dead workers, purge old results. It sees backends only through the storage
contract (``_backend``, ``_records``, ``_errors``) and never imports a backend."""
