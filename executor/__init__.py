"""pve-reconcile executor: the node daemon (built in a later issue).

Layers (checked by import-linter): may import ``journal`` and the generated ``planner.v1``
contract, never the planner's own modules.
"""
