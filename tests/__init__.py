"""pve-reconcile tests."""
