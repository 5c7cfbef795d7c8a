"""Shared by the backend tests in this directory and below it: being a conftest, this file puts the
directory on ``sys.path``, so the test modules of ``redis/`` and ``postgres/`` import ``corruption`` (the raw
writers behind the damaged-record rules) like the modules here do."""
