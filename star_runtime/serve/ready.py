"""Waiting for a star-serve process to be ready: what an app that starts the server needs first.

    proc = subprocess.Popen(["star-serve", "--model", "bundle", "--port", "8000"])
    wait_until_ready("http://127.0.0.1:8000", timeout=300, process=proc)   # loading: up to minutes

The server answers /health with 200 once its model is loaded (503 before); the standard library
alone asks, so a client needs none of the server's libraries.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request

POLL_S = 0.1


class NotReady(RuntimeError):
    """The server did not become ready: it exited, or the time ran out."""


def is_ready(url: str) -> bool:
    """Whether GET url/health answers 200 now."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):  # refused, 503 (an HTTPError), reset
        return False


def wait_until_ready(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Return once url/health answers 200; NotReady when `process` exits first or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while not is_ready(url):
        if process is not None and process.poll() is not None:
            raise NotReady(f"star-serve exited with {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise NotReady(f"star-serve at {url} was not ready after {timeout:g} s")
        time.sleep(POLL_S)
