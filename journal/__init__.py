"""pve-reconcile journal: durable operation journal and idempotency store.

A leaf package: standard library only (checked by import-linter).
"""
