#!/usr/bin/env python3
"""Check that the official `openai` and `anthropic` Python SDKs parse every simulator reply.

Not run by `cargo test` (it needs the SDKs: `pip install openai anthropic`). Usage:

    cargo run -p tollgate-sim --example sim -- --listen 127.0.0.1:8011 &
    python3 crates/tollgate-sim/tests/sdk_check.py http://127.0.0.1:8011

Exits non-zero on the first mismatch.
"""
import sys

import anthropic
import openai

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8011"
oa = openai.OpenAI(base_url=base + "/v1", api_key="sk-sim", max_retries=0)
an = anthropic.Anthropic(base_url=base, api_key="sk-ant-sim", max_retries=0)
msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
# prompt tokens: (1 + 2) + (1 + 2) = 6

models = oa.models.list()
assert len(models.data) == 1, models

r = oa.chat.completions.create(model="m", messages=msgs, max_tokens=5, n=2)
assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 10, r.usage
assert len(r.choices) == 2 and r.choices[0].message.content.split() == r.choices[1].message.content.split()

chunks = list(oa.chat.completions.create(model="m", messages=msgs, max_tokens=7, stream=True,
                                         stream_options={"include_usage": True}))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert len(text.split()) == 7, text
assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7, chunks[-1]

with oa.chat.completions.stream(model="m", messages=msgs, max_tokens=3) as s:
    final = s.get_final_completion()
assert len(final.choices[0].message.content.split()) == 3

c = oa.completions.create(model="m", prompt="one two three", max_tokens=4)
assert c.usage.prompt_tokens == 3 and c.usage.completion_tokens == 4
cs = list(oa.completions.create(model="m", prompt="x", max_tokens=4, stream=True,
                                stream_options={"include_usage": True}))
assert cs[-1].usage.total_tokens == 5, cs[-1]

resp = oa.responses.create(model="m", input="ping pong", max_output_tokens=3)
assert resp.usage.input_tokens == 2 and resp.usage.output_tokens == 3 and len(resp.output_text.split()) == 3
events = list(oa.responses.create(model="m", input="ping", max_output_tokens=4, stream=True))
assert events[-1].type == "response.completed" and events[-1].response.usage.output_tokens == 4
with oa.responses.stream(model="m", input="ping", max_output_tokens=2) as s:
    fr = s.get_final_response()
assert fr.usage.output_tokens == 2 and len(fr.output_text.split()) == 2

e = oa.embeddings.create(model="m", input=["a b", "c"])  # SDK asks for base64 and decodes it
assert len(e.data) == 2 and len(e.data[0].embedding) == 16 and e.usage.prompt_tokens == 3
e = oa.embeddings.create(model="m", input="a", encoding_format="float", dimensions=8)
assert len(e.data[0].embedding) == 8

m = an.messages.create(model="claude", max_tokens=6, system="be nice", messages=[{"role": "user", "content": "hi you"}])
assert m.usage.input_tokens == 6 and m.usage.output_tokens == 6 and len(m.content[0].text.split()) == 6
with an.messages.stream(model="claude", max_tokens=9, messages=[{"role": "user", "content": "hi"}]) as s:
    text = "".join(s.text_stream)
    fm = s.get_final_message()
assert len(text.split()) == 9 and fm.usage.output_tokens == 9 and fm.usage.input_tokens == 2, fm.usage
raw = list(an.messages.create(model="claude", max_tokens=2, messages=[{"role": "user", "content": "hi"}], stream=True))
assert [ev.type for ev in raw][0] == "message_start" and raw[-1].type == "message_stop"

try:
    oa.chat.completions.create(model="m", messages=msgs, extra_headers={"x-sim-fault": "status-429"})
    raise AssertionError("expected 429")
except openai.RateLimitError as err:
    assert err.response.headers["retry-after"] == "7"
try:
    an.messages.create(model="c", max_tokens=1, messages=[], extra_headers={"x-sim-fault": "status-500"})
    raise AssertionError("expected 500")
except anthropic.InternalServerError:
    pass

print("openai", openai.__version__, "anthropic", anthropic.__version__, ": all SDK checks passed")
