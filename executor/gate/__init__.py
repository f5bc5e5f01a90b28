"""The safety gate: admission (``gate``), the lane that alone holds the Proxmox writer (``lane``), the
approval book (``approvals``: pending approvals and the refusal counts), the journal's read side or its
stand-in (``journalport``), the decision values (``decisions``), the action table (``kinds``,
``actions``), the remote-stop ledger (``stopledger``), signed ops as steps and the journal keys they
spend (``steps``), and the state-dir files the gate keeps beside the journal (``files``).

Imported by every room above it (loop, signed, api, app); imports only ``executor.pve`` and
``executor.metrics`` of the executor. What it needs from above is a Protocol defined here
(``gate.NodeView``, ``lane.Ahead``). ``lane`` never sees the gate: the gate hands it the collaborators
they share (the journal port and its writes, ``journalport.JournalWrites``; the approval book).
"""
