"""The executor's programs: the daemon, the dry run, selftest, and the one place their parts are built.

``wiring`` builds every object (the Proxmox writer goes to the gate and nowhere else); ``daemon`` runs
them (recover, tick, serve the API, stop); ``dryrun`` is ``pve-executor plan`` (no writer);
``selftest`` is ``pve-executor selftest``; ``connect`` turns settings into connections and TLS.

Imported by ``executor.cli`` only; may import every room below it (api, signed, loop, gate, pve).
"""
