"""The local Messages API itself (src/lab/fakes/messages_server.py): prompt-cache lifetimes and minimum lengths on
its virtual clock, and the requests it refuses as the real API does.

Run: python -m pytest -q tests/lab/fakes/test_messages_server.py
"""
from __future__ import annotations

import pytest

from src.lab.fakes.messages_server import MessagesServer, text
from src.lab.agents.claude_context import TOOL_NAME, tool_schema
from tests.support.claude import KEY


def test_the_server_models_cache_lifetimes_and_minimum_lengths():
    import anthropic

    system = [{"type": "text", "text": "x" * 6000, "cache_control": {"type": "ephemeral"}}]
    msgs = [{"role": "user", "content": "hello"}]
    with MessagesServer(api_key=KEY, min_cache_tokens={"claude-haiku-4-5": 4096}) as srv:
        srv.fallback = text("ok")
        c = anthropic.Anthropic(api_key=KEY, base_url=srv.url, max_retries=0)
        ask = lambda model="claude-sonnet-4-6", ttl=None: c.messages.create(  # noqa: E731
            model=model, max_tokens=100, messages=msgs,
            system=[{**system[0], "cache_control": {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}}]).usage
        assert ask().cache_creation_input_tokens > 1000
        srv.advance(240)
        assert ask().cache_read_input_tokens > 1000  # within 5 minutes: read (and refreshed)
        srv.advance(299)
        assert ask().cache_read_input_tokens > 1000  # 5 minutes since the last read, not since the write
        srv.advance(301)
        assert ask().cache_read_input_tokens == 0  # expired: written again
        srv.advance(301)
        assert ask(ttl="1h").cache_creation.ephemeral_1h_input_tokens > 1000
        srv.advance(3000)
        assert ask(ttl="1h").cache_read_input_tokens > 1000  # a 1-hour entry outlives 50 minutes
        short = ask(model="claude-haiku-4-5")  # 1,500 tokens is below Haiku 4.5's minimum: nothing cached
        assert short.cache_creation_input_tokens == 0 and short.cache_read_input_tokens == 0
        assert ask(model="claude-haiku-4-5").cache_read_input_tokens == 0


def test_the_server_refuses_what_the_api_refuses():
    import anthropic

    with MessagesServer(api_key=KEY) as srv:
        srv.fallback = text("ok")
        c = anthropic.Anthropic(api_key=KEY, base_url=srv.url, max_retries=0)
        tool = tool_schema(False, False)
        call = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": srv.sign("t")},
                                                  {"type": "tool_use", "id": "toolu_1", "name": TOOL_NAME,
                                                   "input": {}}]}]
        result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}
        bad = {
            "text before tool_result": call + [{"role": "user", "content": [{"type": "text", "text": "x"}, result]}],
            "tampered thinking": [call[0], {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "t2", "signature": srv.sign("t")}, call[1]["content"][1]]},
                {"role": "user", "content": [result]}],
        }
        for why, msgs in bad.items():
            with pytest.raises(anthropic.BadRequestError):
                c.messages.create(model="m", max_tokens=2000, messages=msgs, tools=[tool])
        with pytest.raises(anthropic.BadRequestError, match="forces tool use"):
            c.messages.create(model="m", max_tokens=2000, messages=[call[0]], tools=[tool],
                              thinking={"type": "adaptive"}, tool_choice={"type": "tool", "name": TOOL_NAME})
        with pytest.raises(anthropic.BadRequestError, match="additionalProperties"):
            c.messages.create(model="m", max_tokens=2000, messages=[call[0]], tools=[
                {**tool, "strict": True, "input_schema": {"type": "object", "properties": {}}}])
        ok = c.messages.create(model="m", max_tokens=2000, messages=call + [{"role": "user", "content": [result]}],
                               tools=[tool])
        assert ok.stop_reason == "end_turn"
