"""A provider plugin for tests: the local cloud under the name ``toy``."""
