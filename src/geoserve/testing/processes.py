"""Processes for end-to-end tests and benchmarks: free loopback ports, ``geoserve``
commands run as subprocesses (started, waited for, stopped), and the one-replica
fleet file whose latency profile matches a fake replica's speed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

__all__ = ["free_port", "geoserve_process", "banner_process", "fast_fleet_toml"]


def free_port() -> int:
    """A loopback TCP port nobody listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def geoserve_process(*args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """``python -m geoserve *args``: yields once it printed its banner line (it
    listens by then), terminates it on exit."""
    with banner_process([sys.executable, "-m", "geoserve", *args]) as started:
        yield started


@contextmanager
def banner_process(argv: list[str]) -> Iterator[tuple[subprocess.Popen, str]]:
    """Any server that prints a line once it listens: started, yielded, terminated."""
    proc = subprocess.Popen(argv, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        banner = proc.stdout.readline()
        if not banner:
            raise RuntimeError(f"{' '.join(argv)} exited with {proc.wait()}")
        yield proc, banner
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()


def fast_fleet_toml(replica_port: int, speed: float = 1000.0, model: str = "llama-70b") -> str:
    """One region, one replica on ``replica_port``, 512 decode slots, and the 70B
    profile divided by ``speed`` - what a ``geoserve fake-replica --speed`` is."""
    return (f'regions = ["us"]\nrtt_ms = [[2.0]]\n[[deployments]]\nmodel = "{model}"\nversion = "v1"\n'
            f'region = "us"\ndecode_slots = 512\nreplicas = [{{id = "r0", endpoint = "127.0.0.1:{replica_port}"}}]\n'
            f'[models.{model}]\nprefill_base_ms = {7.7 / speed!r}\nprefill_ms_per_token = {0.107 / speed!r}\n'
            f'tpot_base_ms = {28.4 / speed!r}\ntpot_ms_per_batch = {0.35 / speed!r}\n')
