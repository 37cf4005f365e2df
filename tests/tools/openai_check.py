#!/usr/bin/env python3
"""Drives `kimi-actors serve` with the official OpenAI Python client (test tooling, run by tests/openai_client.rs).

Usage: python tests/tools/openai_check.py BASE_URL API_KEY
"""
import sys
import openai
from openai import OpenAI

base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/v1", api_key=key)

models = client.models.list()
model = models.data[0].id
assert model == "tiny-kimi-story", model

messages = [{"role": "user", "content": "Good morrow, sir. What news from the court?"}]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=40)
assert r.choices[0].message.content == "I am glad to see you.", r
assert r.choices[0].finish_reason == "stop", r
assert r.usage.completion_tokens == 8, r.usage

stream = client.chat.completions.create(model=model, messages=messages, max_tokens=40, stream=True,
                                        stream_options={"include_usage": True})
parts, finish, usage = [], None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert "".join(parts) == "I am glad to see you.", parts
assert finish == "stop" and usage.completion_tokens == 8, (finish, usage)

tools = [{"type": "function", "function": {"name": "get_weather", "description": "Get weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather in Tokyo?"}],
                                   tools=tools, max_tokens=5)
assert r.choices[0].message.role == "assistant"

try:
    client.chat.completions.create(model="gpt-9", messages=messages)
    raise SystemExit("an unknown model should be refused")
except openai.NotFoundError as e:
    assert "gpt-9" in str(e), e

try:
    OpenAI(base_url=base + "/v1", api_key="wrong").models.list()
    raise SystemExit("a wrong key should be refused")
except openai.AuthenticationError:
    pass

print("ok")
