"""Safety core: classifier, reversibility gate support and signed operations (standard library + cryptography).

The rules of this package (checked by import-linter):

- Pure where it decides: classifying, scoping and verifying are functions of values (no clock, no
  Proxmox reads; the caller passes what it already read, ``GuestFacts``, and the time), so they add no
  reads to a tick. Only ``safety.truststore`` touches a file: it reads the trust store, checking its
  owner and mode.
- ``safety.model``, ``safety.keys``, ``safety.classify``, ``safety.scope`` and ``safety.blast`` use
  the standard library only: they import neither ``planner``, ``executor``, ``journal``, ``common``
  nor gRPC/protobuf. The signed-op modules may also use ``cryptography``, nothing else.
- Fail closed, never halt: an unknown kind is DESTRUCTIVE, an unknown config key needs approval,
  and the source of an action can only raise its class, never lower it.
- ``safety.keys`` is the single source of how each PVE config key is classed (docs/SAFETY.md §2.1).
"""
