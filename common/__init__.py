"""Service plumbing shared by the planner and the executor: logging, layered config, TLS.

A leaf under both services (checked by import-linter): it imports neither ``planner``,
``executor`` nor ``journal``, so sharing it never couples the services' own code.
"""
