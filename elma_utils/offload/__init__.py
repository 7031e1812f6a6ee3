"""Offloading hard questions from the edge to the server.

Transport-independent parts: ``protocol`` (the JSON-lines messages both sides speak),
``store`` (the server's SQLite store of offloaded questions, exported as SQuAD json) and
``outbox`` (the edge's SQLite queue of offloads not sent yet). The SSH transport lives in
the ``ssh_*`` modules beside them.
"""
