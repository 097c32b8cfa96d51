"""The running platform: the Serve deployments (`gateway`, `model`, `admission` with `coalesce`),
the serve config (`config`), errors to HTTP (`errors`), tenants, keys, quotas and the usage ledger
(`tenants`), batch scoring (`batch`) and the local platform's lifecycle (`platform`).

Modules are imported by name; importing this package pulls in nothing.
"""
