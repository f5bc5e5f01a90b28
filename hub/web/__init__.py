"""The hub's read-only web page (``pve-hub serve --web-listen``): server-rendered HTML over the Store.

Everything a node or a document sends (guest names, descriptions, tags, reasons, node names) is
attacker-controlled text: the templates autoescape everything, URLs are built by quoting each segment, and a
strict Content-Security-Policy forbids every script. No JavaScript: the pages refresh themselves (meta refresh).
"""
