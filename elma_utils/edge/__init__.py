"""The device program: everything that runs on the board, and nothing that needs TensorFlow.

- :mod:`.runtime`: the edge bundle (LiteRT parts) answered layer by layer, exiting early.
- :mod:`.tokenizer`: the plain-Python WordPiece/SentencePiece back ends the runtime uses.
- :mod:`.protocol`: the JSON-lines messages device and server speak (the server imports it too).
- :mod:`.ssh_keys`: ed25519 keys, ``known_hosts`` and ``authorized_keys`` in OpenSSH's formats.
- :mod:`.ssh_client`: the one persistent, pinned SSH connection to the server.
- :mod:`.identity`: asks signed with the device's key (and the server's check of them).
- :mod:`.client`: ``EdgeQA``: answer on the device, offload what it cannot settle.
- :mod:`.outbox`: the SQLite queue of offloads the server has not received yet.
- :mod:`.sync`: fetch, verify and swap in new bundles (SFTP, sha256, atomic, rollback).
- :mod:`.input_checks`: one-line checks of every input (question, audio, keys, known_hosts,
  bundle) before any model loads.
- :mod:`.device_config`: ``elma device init`` and the device's TOML config, checked whole.
- :mod:`.question_sources`: questions from stdin, a watched folder (each file once), a microphone.
- :mod:`.device`: ``elma device run``: the long-running loop, background outbox drain and sync,
  the model swapped between questions.

The speech front end is :mod:`elma_utils.speech` (also TensorFlow-free). A test imports every
module here in a fresh interpreter and fails if ``tensorflow`` or ``keras`` comes with it.
"""
