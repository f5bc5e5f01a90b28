"""pve-reconcile executor: the node daemon.

Reads the node through ``pve.ProxmoxNode`` (a reader), plans through the planner service, and
mutates only through ``gate.Gate``, which holds the one ``pvewrite.ProxmoxWriter`` and runs each
admitted step in the per-guest ``queue``. ``kinds`` is the action table; ``observe`` the one read
path of the tick, the dry run and selftest; ``recovery`` resolves in-flight operations at start.

Layers (checked by import-linter): may import ``journal``, ``safety``, ``common`` and the
generated ``planner.v1`` contract, never the planner's own modules; only ``daemon`` (the wiring)
imports ``pvewrite``.
"""
