"""Fixtures for the agent=claude tests: a local Messages API server, the key it accepts, and its clock as the
agent's. Helpers (KEY, agent_for, step, ...) live in tests/support/claude.py.

Run: python -m pytest -q tests/lab/agents/   (the suite loads this module; it holds no tests)
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from src.lab.fakes.messages_server import MessagesServer
from tests.support.claude import KEY


@pytest.fixture
def server():
    """A local Messages API (src/lab/fakes/messages_server.py) that accepts KEY; tests script its replies."""
    with MessagesServer(api_key=KEY) as srv:
        yield srv


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    return KEY


@pytest.fixture
def server_clock(server, monkeypatch):
    """The agent's clock is the server's: ClaudeAgent and ClaudeClient read server.now() and their waits advance
    it (server.advance) instead of sleeping, so a test lets agent.probe_s pass without waiting for it. Only the
    name `time` in those two modules is replaced, not the time module."""
    clock = SimpleNamespace(monotonic=server.now, sleep=server.advance, strftime=time.strftime)
    for module in ("src.lab.agents.claude", "src.lab.agents.claude_client"):
        monkeypatch.setattr(f"{module}.time", clock)
    return server
