"""The official anthropic SDK through tollgate (Messages API on the built-in simulator):
counted streamed and not, and a 429 the SDK turns into RateLimitError."""
import anthropic
import pytest

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def client(gw, key):
    return anthropic.Anthropic(base_url=f"http://{gw.proxy}", api_key=key, max_retries=0)


def test_messages_and_stream(quickstart):
    c = client(quickstart, "iamagolduser")
    m = c.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hello"}])
    assert m.usage.output_tokens == 8
    assert m.content[0].text
    with c.messages.stream(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text
    assert final.usage.output_tokens == 5


def test_messages_rate_limited(tmp_path):
    import conftest
    cfg = open(conftest.ROOT + "/examples/quickstart.yaml").read().replace(
        'request.path == "/v1/chat/completions"', 'llm.api == "messages"')
    gw = conftest.Gateway(cfg)
    try:
        c = client(gw, "iamafreeuser")
        with pytest.raises(anthropic.RateLimitError) as exc:
            for _ in range(20):
                c.messages.create(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "hi"}])
        assert exc.value.status_code == 429
        assert int(exc.value.response.headers["retry-after"]) >= 1
    finally:
        gw.stop()
