"""The executor's gRPC edge: the servicer, its proto conversion both ways, and the server's start.

The only room that touches ``grpc`` and the ``executor.v1`` messages on the daemon's side: the rooms
below it take and return domain values. Imported by ``executor.app``; may import signed, loop, gate
and pve.
"""
