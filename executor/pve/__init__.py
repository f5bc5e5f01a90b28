"""Proxmox: the reader (``node.ProxmoxNode``, its protocol ``PveReader``), the answers' parsing
(``parse``), task waiting, the writer (``write.ProxmoxWriter``), and why a call failed (``failures``: one
row per cause, a stable code and the flag to fix).

The bottom room: imports no other executor room. Every room may import ``node`` and ``parse``; only
``executor.app.wiring`` imports ``write`` (it hands the writer to the gate; an import-linter contract).
"""
