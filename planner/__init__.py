"""pve-reconcile planner: the stateless service that turns desired + actual into a plan.

Layers (checked by import-linter): ``planner`` imports neither ``executor`` nor ``journal``.
Inside, ``model``/``normalize``/``plan``/``validate`` are pure; only ``service`` and ``server``
touch protobuf and gRPC. ``planner.v1`` is the generated contract, shared with the executor.
"""
