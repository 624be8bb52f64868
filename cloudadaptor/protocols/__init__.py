"""Generated protobuf modules (checked in; regenerate with ``make protos``).

Each ``.proto`` in ``protos/`` has a ``<name>_pb2.py`` and ``.pyi`` here;
``generate.py`` produces them and the drift test compares.
"""
