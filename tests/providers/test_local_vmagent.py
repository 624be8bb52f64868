"""The namespace VM's forked agent: MODULE runs as ``__main__`` exactly as ``python -m MODULE`` runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cloudadaptor.providers import local_vmagent

PROBE = '''
import json, sys
if __name__ == "__main__":  # preload imports it too
    json.dump({"name": __name__, "argv": sys.argv, "file": __file__, "package": __package__,
               "spec": __spec__.name, "main_is_me": sys.modules["__main__"].__dict__ is globals(),
               "doc": __doc__}, open(sys.argv[1], "w"))
'''


def test_a_forked_agent_runs_its_module_as_python_m_does(tmp_path: Path, monkeypatch):
    package = tmp_path / "probepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "agentprobe.py").write_text('"""probe."""\n' + PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(local_vmagent, "_COMPILED", {})
    expected_out, forked_out = tmp_path / "python-m.json", tmp_path / "forked.json"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "probepkg.agentprobe", str(expected_out), "x"], check=True, env=env)

    argv = [sys.executable, "-m", "probepkg.agentprobe", str(forked_out), "x"]
    try:
        local_vmagent.preload(argv)
        assert "probepkg.agentprobe" in local_vmagent._COMPILED, "compiled once, before the fork"
        zygote = local_vmagent.AgentZygote(argv)
        _, status = os.waitpid(zygote.start(), 0)
    finally:
        for name in ("probepkg.agentprobe", "probepkg"):  # imported by preload
            sys.modules.pop(name, None)
    assert os.waitstatus_to_exitcode(status) == 0
    expected, forked = json.loads(expected_out.read_text()), json.loads(forked_out.read_text())
    expected["argv"][1] = forked["argv"][1] = "<out>"
    assert forked == expected
