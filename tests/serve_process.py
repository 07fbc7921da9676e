"""star-serve as a real process for the tests: started on a free loopback port, its log read.

    srv = Server("--model", str(bundle), "--log-messages")   # returns once it listens
    srv.wait_ready()                                          # /health answers 200
    ... srv.url ..., srv.lines (its stderr, a line per request) ...
    srv.stop()                                                # SIGTERM, then its exit code
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from star_runtime.serve.ready import NotReady, wait_until_ready

SERVE = [sys.executable, "-m", "star_runtime.serve"]
START_S = 120  # a loaded 2-core machine opens the bundle and self-checks it in a few seconds


class Server:
    """star-serve on a free port; its stderr is collected line by line (it logs every request).

    Without --model in `args` it serves the installed default bundle: $STAR_BUNDLE and
    $STAR_SERVE_API_KEY are left out of its environment, `env` is added to it."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        base = {k: v for k, v in os.environ.items() if k not in ("STAR_BUNDLE", "STAR_SERVE_API_KEY")}
        self.proc = subprocess.Popen([*SERVE, "--port", "0", "--threads", "1", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**base, **(env or {})})
        self.lines: list[str] = []
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(START_S):
            self.stop()
            pytest.fail(f"star-serve did not start: {self.log}")
        self.url = re.search(r"http://[^ ]+", next(x for x in self.lines if "listening on" in x)).group(0)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if "listening on" in line:
                self._listening.set()
        self._listening.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_ready(self) -> None:
        try:
            wait_until_ready(self.url, START_S, self.proc)
        except NotReady as err:
            pytest.fail(f"{err}: {self.log}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
