"""The xDS socket as the shipped DaemonSet makes it: an agent without CAP_CHOWN, in the proxy's group. A real
agent-side server started in a child without CAP_CHOWN, and a real unix-socket connect as the proxy's uid."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.root
SERVE = """
import os, sys, time
from pathlib import Path
from controlplane.server import AdsServer
from controlplane.store import Store
os.setgid(101)
server = AdsServer(Store()).start(socket_path=Path(sys.argv[1]), owner=101)
print("READY", flush=True)
time.sleep(30)
"""


def test_without_cap_chown_the_socket_is_group_reachable_by_the_proxy() -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is needed to drop CAP_CHOWN")
    run = Path(tempfile.mkdtemp(prefix="lightpath-run-", dir="/tmp"))  # like /run/lightpath: 0755, reachable by 101
    os.chmod(run, 0o755)
    sock = run / "xds.sock"
    proc = subprocess.Popen([setpriv, "--bounding-set=-chown", "--inh-caps=-chown", sys.executable, "-c", SERVE,
                             str(sock)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY", proc.stderr
        st = sock.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 101, 0o660)  # chown refused, group kept

        done = subprocess.run([sys.executable, "-c", "import os,socket,sys\nos.setgid(101)\nos.setuid(101)\n"
                               "s=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\nprint('connected')",
                               str(sock)], capture_output=True, text=True, timeout=20)
        assert done.stdout.strip() == "connected", done.stderr
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(run, ignore_errors=True)
