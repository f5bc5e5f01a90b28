"""Signed operations on the daemon's side: the op desk, the signer check, the gate's clock and secret,
the trust keeper, the API's rate limits.

``desk.OpDesk`` proposes, verifies and submits signed ops through a ``desk.Funnel`` (the engine);
``auth`` decides who may sign what; ``clock`` is the gate's time (never before the journal's
high-water mark) and its challenge secret;
``trust`` reloads the trust store; ``rates`` the per-caller token buckets. The step a signed op
becomes, and the journal keys it spends, are the gate's (``executor.gate.steps``): the lane runs it.

Imported by ``executor.api`` and ``executor.app``; may import loop, gate and pve.
"""
