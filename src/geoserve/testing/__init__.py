"""Test doubles that behave like the real thing (a fake inference replica)."""

from .fake_replica import FakeReplica

__all__ = ["FakeReplica"]
