"""The reconcile loop: the tick (``engine``), the per-guest queue, the read path (``observe``, ``readahead``),
recovery at start, the planner client (and ``planner_failures``: why the planner could not be reached)
and the desired-state providers.

Imported by ``executor.signed``, ``executor.api`` and ``executor.app``; may import gate and pve, never
the rooms above it (the gate reads what the loop observed through its own ``NodeView`` protocol).
"""
