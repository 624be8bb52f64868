"""``python -m bench`` (``make bench``): every benchmark in one process tree, one table.

Each figure is shown with the reference it is compared with — a limit, the
direct path, or the kernel's own ceiling — measured in the same run, and the
ratio of the two: absolute times on a shared machine are noisy, ratios are not.
Runs inside the private user+net+mount namespace (it enters it by itself);
nothing on the machine's network changes. ``--quick`` takes about a minute.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from cloudadaptor.dev import privatens

from bench import procs
from bench.table import Row, render

# name → module with ``run(quick: bool) -> list[Row]``; in the order they run
SECTIONS = {
    "agent": "bench.agentpath",
    "agentvm": "bench.agentvm",  # the same calls through a real local pod: the VM init's forwarder
    "pods": "bench.pods",
    "memory": "bench.memory",
    "tunnel": "bench.tunnel_throughput",
}
HELPERS = {"__init__", "__main__", "table", "procs", "proxyproc", "cloudserve"}


def other_scripts() -> dict[str, str]:
    """Benchmarks added to bench/ beside ours: run when they offer ``run(quick)``, else listed."""
    here = Path(__file__).parent
    known = {module.rsplit(".", 1)[1] for module in SECTIONS.values()} | HELPERS
    return {p.stem: f"bench.{p.stem}" for p in sorted(here.glob("*.py")) if p.stem not in known}


def _section(name: str, module_name: str, quick: bool) -> list[Row]:
    module = importlib.import_module(module_name)
    if name == "tunnel":
        return module.run_all(1.0 if quick else 3.0)  # type: ignore[no-any-return]
    return module.run(quick)  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pods, calls and seconds (about a minute)")
    parser.add_argument("--only", action="append", choices=[*SECTIONS, *other_scripts()], metavar="SECTION",
                        help=f"run only this section (repeatable): {', '.join([*SECTIONS, *other_scripts()])}")
    parser.add_argument("--profile", metavar="DIR",
                        help="run the forwarder, proxy and daemon under py-spy (the bench extra); "
                             "collapsed stacks land in DIR")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not privatens.inside():
        privatens.exec_inside([sys.executable, "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    if args.profile:
        if not Path(sys.executable).with_name("py-spy").exists():
            parser.error("--profile needs py-spy beside this Python: `make bench` installs it "
                         "(the bench extra: pip install -e '.[bench]')")
        os.makedirs(args.profile, exist_ok=True)
        os.environ[procs.PROFILE_DIR_ENV] = os.path.abspath(args.profile)
    sections = {**SECTIONS, **other_scripts()}
    chosen = args.only or list(sections)
    rows: list[Row] = []
    failed = []
    began = time.monotonic()
    for name in chosen:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        module = importlib.import_module(sections[name])
        if not hasattr(module, "run") and not hasattr(module, "run_all"):
            print(f"[bench] {name}: {sections[name]} has no run(quick); run it alone", file=sys.stderr)
            continue
        try:
            rows += _section(name, sections[name], args.quick)
        except Exception:  # noqa: BLE001 - one broken section must not hide the others' figures
            traceback.print_exc()
            failed.append(name)
    print(f"\n{'quick' if args.quick else 'full'} run, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, {time.monotonic() - began:.0f} s\n")
    print(render(rows))
    if failed:
        print(f"\nFAILED sections: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
