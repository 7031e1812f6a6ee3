"""The server program: the full model behind SSH, the store of hard questions, the growth loop.

- :mod:`.service`: ``elma serve``: protocol messages in, answers out, stored before the reply.
- :mod:`.batcher`: one worker owns the model; devices are served in turn, in batches.
- :mod:`.store`: the SQLite store of offloaded questions, exported as SQuAD json.
- :mod:`.ssh_endpoint`: ELMA's own SSH server (paramiko) for hosts without a usable sshd.
- :mod:`.sshd`: a confined OpenSSH sshd configuration (and one started for tests/notebooks).
- :mod:`.device_keys`: ``elma keys``: add, list and revoke devices.
- :mod:`.publish`: retrain/distil the edge model from the store, gate it, publish a bundle.
- :mod:`.growth`: the growth loop: after N new hard questions (or on a schedule) a niced
  process retrains, gates and publishes; answering never waits for it.
- :mod:`.status`: ``elma status``: the store, the devices, the published version, the last growth run.
"""
