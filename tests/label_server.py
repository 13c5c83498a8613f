"""Starting and killing `rlhfkit label` servers in tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

from rlhfkit.label.simulate import LabelClient

SAMPLE_ROWS = [{"prompt": f"Review product {i}.", "completions": [f"Great {i}!", f"Broke on day {i}.",
                                                                  f"Fine {i}.", f"<b>{i}</b> & <i>x</i>"]}
               for i in range(12)]


def new_session(tmp_path: Path, rows: list[dict] = SAMPLE_ROWS, name: str = "session") -> Path:
    """A session over ``rows`` made with ``rlhfkit label --samples --no-serve``."""
    samples = tmp_path / f"{name}-samples.jsonl"
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = subprocess.run([sys.executable, "-m", "rlhfkit", "label", str(tmp_path / name), "--samples",
                             str(samples), "--no-serve"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return tmp_path / name


class Server:
    """``rlhfkit label SESSION ARGS`` on a free port, in its own process group."""

    def __init__(self, session: Path, *args: str, token: str | None = None):
        self.session, self.args, self.token = session, args, token
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self, timeout: float = 60) -> Self:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.token:
            env["RLHFKIT_LABEL_TOKEN"] = self.token
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rlhfkit", "label", str(self.session), "--port", str(self.port), *self.args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.time() + timeout
        assert self.process.stdout is not None
        while time.time() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"the server stopped: {self.process.wait()}")
            found = re.search(r"at http://127\.0\.0\.1:(\d+)/", line)
            if found:
                self.port = int(found.group(1))  # a restart keeps the port: the page reconnects
                return self
        raise AssertionError("the server did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> LabelClient:
        return LabelClient(self.url, token=self.token, timeout=10)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
