"""Proxmox: the reader (``node.ProxmoxNode``, its protocol ``PveReader``), the answers' parsing
(``parse``), task waiting, and the writer (``write.ProxmoxWriter``).

The bottom room: imports no other executor room. Every room may import ``node`` and ``parse``; only
``executor.app.wiring`` imports ``write`` (it hands the writer to the gate; an import-linter contract).
"""
