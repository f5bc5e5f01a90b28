"""pve-reconcile hub: one signed desired state per cluster, versioned, served to every node's executor.

The hub is a courier: documents are DSSE envelopes signed by operator keys, verified by each
executor against its own trust store. ``hub.store`` keeps them (SQLite embedded, or PostgreSQL for
several replicas). The executor never imports this package, only the hub's generated gRPC contract.
"""
