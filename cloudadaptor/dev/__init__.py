"""Development tools the demo runs: shim emulator, development agent, private namespace runner, CNI-like pod netns.

Nothing here fakes a cloud or accepts any credential; those doubles live under
``tests/fakes`` and never ship. Product modules do not import this package
(an import-linter contract says so); only ``demo``, the local provider's
default agent command and the tests use it.
"""
