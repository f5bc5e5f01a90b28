"""node@cluster (a standalone node: node): what a signed approval names, read once from Proxmox when first needed."""

from __future__ import annotations

from executor.pve.node import PveError, PveReader


class Audience:
    """The executor's audience: the configured one, else node@cluster as read, or node alone outside a cluster."""

    def __init__(self, reader: PveReader, configured: str | None = None) -> None:
        """``configured``: the executor_id setting (None: read the cluster name from ``reader``)."""
        self._reader, self._audience = reader, configured

    def __call__(self) -> str:
        """node@cluster (``node@`` while the cluster name cannot be read: not cached, the next call tries again)."""
        if self._audience is None:
            try:
                cluster = self._reader.cluster_name()
            except PveError:
                return f"{self._reader.node}@"
            # A node outside a cluster has no cluster name: its audience is the node's name alone.
            self._audience = f"{self._reader.node}@{cluster}" if cluster else self._reader.node
        return self._audience
