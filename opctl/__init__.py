"""opctl: the operator's offline tool for signed operations (``pve-executor op ...`` is the same tool).

``keys generate``, ``trust check``, ``op sign``, ``op cosign`` and ``op verify`` read and write files
only; ``pending``, ``op propose``, ``op submit``, ``op status``, ``op revoke`` and ``op undo`` call the
executor API.
None of them talks to Proxmox.

``cli`` parses and dispatches (each command imported when run); ``keys`` makes keys and checks a
trust store; ``doc`` reads proposals and words refusals; ``sign`` signs, co-signs and verifies;
``api``, ``status`` and ``undo`` talk to the executor API (``connect`` says where it is: flags, the
environment, or the daemon's executor.toml).

Layers (checked by import-linter): imports ``safety``, ``common`` and the generated ``executor.v1``
contract only, never the daemon's rooms, the journal or proxmoxer, so it installs and runs on an
operator's machine without them.
"""
