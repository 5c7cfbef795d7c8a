"""The built-in stores, one subpackage each. A backend imports only the storage contract (``_backend``,
``_records``, ``_errors``) and the package's bottom modules."""
