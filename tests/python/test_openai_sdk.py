"""The official openai SDK against tollgate's quickstart: it works, streams, and turns
tollgate's 429 into RateLimitError with the body and headers it understands."""
import openai
import pytest

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def client(gw, key):
    # max_retries=0: the SDK would otherwise retry 429s itself (honouring retry-after).
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)


def test_chat_completion_through_gateway(quickstart):
    c = client(quickstart, "iamagolduser")
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=7)
    assert r.usage.completion_tokens == 7
    assert r.choices[0].message.content
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=3)
    assert raw.headers["x-ratelimit-limit-tokens"] == "200"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 200


def test_free_user_gets_rate_limit_error_gold_carries_on(quickstart):
    free = client(quickstart, "iamafreeuser")
    spent = 0
    with pytest.raises(openai.RateLimitError) as exc:
        for _ in range(20):
            r = free.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10)
            spent += r.usage.total_tokens
    assert spent >= 50
    err = exc.value
    assert err.status_code == 429
    assert err.code == "rate_limit_exceeded"
    assert err.type == "tokens"
    assert int(err.response.headers["retry-after"]) >= 1
    assert err.response.headers["x-ratelimit-remaining-tokens"] == "0"

    gold = client(quickstart, "iamagolduser")
    r = gold.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10)
    assert r.usage.completion_tokens == 10

    quickstart.advance(60_000)
    r = free.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_bad_key_is_authentication_error(quickstart):
    with pytest.raises(openai.AuthenticationError) as exc:
        client(quickstart, "nope").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert exc.value.code == "invalid_api_key"


def test_stream_without_usage_is_counted_and_looks_untouched(quickstart):
    c = client(quickstart, "iamafreeuser")
    chunks = list(c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=30, stream=True))
    assert chunks, "no chunks"
    # The client did not ask for usage: no chunk carries it.
    assert all(getattr(ch, "usage", None) is None for ch in chunks)
    text = "".join((ch.choices[0].delta.content or "") for ch in chunks if ch.choices)
    assert text
    # ...but the gateway counted it: another 30-token call crosses 50, the next is refused.
    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=30)
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)


def test_stream_with_usage_keeps_usage(quickstart):
    c = client(quickstart, "iamagolduser")
    chunks = list(c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True}))
    usage = [ch.usage for ch in chunks if getattr(ch, "usage", None) is not None]
    assert len(usage) == 1
    assert usage[0].completion_tokens == 5


def test_other_openai_apis(quickstart):
    c = client(quickstart, "iamagolduser")
    r = c.completions.create(model=MODEL, prompt="one two three", max_tokens=4)
    assert r.usage.completion_tokens == 4
    e = c.embeddings.create(model=MODEL, input=["a b", "c"])
    assert e.usage.prompt_tokens > 0
    resp = c.responses.create(model=MODEL, input="hello there", max_output_tokens=6)
    assert resp.usage.output_tokens == 6
    with c.responses.stream(model=MODEL, input="hi", max_output_tokens=3) as s:
        for _ in s:
            pass
        final = s.get_final_response()
    assert final.usage.output_tokens == 3
