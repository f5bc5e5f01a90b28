"""pve-reconcile executor: the node daemon, in rooms, each importing only the rooms below it.

``cli`` (flags -> ``config.ExecutorSettings`` -> a command of ``app``; exit codes only)
  > ``app``    the programs: ``wiring`` (the one place parts are built), ``daemon``, ``dryrun``, ``selftest``
  > ``api``    the gRPC servicer and its proto conversion
  > ``signed`` signed ops on the daemon's side: the op desk, the signer check, the gate's clock, trust, rates
  > ``loop``   the tick (``engine``), queue, read path, recovery, planner client, desired-state providers
  > ``gate``   admission, the lane (the only holder of the Proxmox writer), the action table
  > ``pve``    the Proxmox reader, answer parsing, task waiting, the writer (only ``app.wiring`` imports it)
``config``, ``metrics``, ``errors`` (the error tree) and the generated ``v1`` are leaves any room may import.
The operator's tool is the top-level ``opctl`` (``pve-executor keys|trust|pending|op`` is its alias, in ``cli``).

Layers (checked by import-linter, see each room's ``__init__``): may import ``journal``, ``safety``,
``common`` and the generated ``planner.v1`` contract, never the planner's own modules.
"""
