"""/metrics parsed by the official prometheus_client OpenMetrics parser (not ours), with
values checked after known traffic."""
import urllib.request

import openai
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def scrape(gw):
    with urllib.request.urlopen(f"http://{gw.admin}/metrics") as r:
        assert r.headers["content-type"].startswith("application/openmetrics-text")
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(families, name, suffix, **labels):
    for s in families[name].samples:
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def test_metric_families_after_known_traffic(quickstart):
    gold = openai.OpenAI(base_url=quickstart.base_url, api_key="iamagolduser", max_retries=0)
    free = openai.OpenAI(base_url=quickstart.base_url, api_key="iamafreeuser", max_retries=0)
    r = gold.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=7)
    prompt, completion = r.usage.prompt_tokens, r.usage.completion_tokens
    list(gold.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=3, stream=True))
    free.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=60)
    with pytest.raises(openai.RateLimitError):
        free.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=quickstart.base_url, api_key="bad", max_retries=0).models.list()

    m = scrape(quickstart)
    assert sample(m, "tollgate_requests", "_total", route="llm", decision="allowed", status_class="2xx") == 3
    assert sample(m, "tollgate_requests", "_total", route="llm", decision="limited", status_class="4xx") == 1
    assert sample(m, "tollgate_requests", "_total", decision="unauth") == 1
    gold_completion = sample(m, "tollgate_tokens", "_total", policy="trlp-tutorial-token-limits",
                             limit="gold", type="completion", model=MODEL)
    assert gold_completion == completion + 3
    assert sample(m, "tollgate_tokens", "_total", limit="gold", type="prompt") >= prompt
    assert sample(m, "tollgate_upstream_latency_seconds", "_count", route="llm", backend="sim") == 3
    assert sample(m, "tollgate_time_to_first_token_seconds", "_count", route="llm") == 1
    assert sample(m, "tollgate_reservations_outstanding", "") == 0
    assert sample(m, "tollgate_counters_live", "") == 2
    assert sample(m, "tollgate_store_latency_seconds", "_count", op="admit") >= 4
    assert sample(m, "tollgate_config_reloads", "_total", result="failure") == 0
    assert sample(m, "tollgate_estimated_calls", "_total") == 0
    assert sample(m, "tollgate_stream_cutoffs", "_total") == 0
    assert sample(m, "tollgate_settle_failures", "_total") == 0
    # No user ids or keys as labels.
    for fam in m.values():
        for s in fam.samples:
            for v in s.labels.values():
                assert v not in ("user-1", "user-2", "iamafreeuser", "iamagolduser"), (fam.name, s)


def test_per_counter_series_are_opt_in_and_capped():
    import os
    import conftest
    with open(os.path.join(conftest.ROOT, "examples", "quickstart.yaml")) as f:
        cfg = f.read() + "metrics:\n  counter_labels: true\n  max_counter_series: 1\n"
    gw = conftest.Gateway(cfg)
    try:
        gold = openai.OpenAI(base_url=gw.base_url, api_key="iamagolduser", max_retries=0)
        free = openai.OpenAI(base_url=gw.base_url, api_key="iamafreeuser", max_retries=0)
        g = gold.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=30)
        free.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        m = scrape(gw)
        series = [s for s in m["tollgate_counter_value"].samples]
        assert len(series) == 1, series  # capped, the most spent first
        assert series[0].labels["counter"] == "trlp-tutorial-token-limits/gold/60000/user-2"
        assert series[0].value == g.usage.total_tokens
        limits = m["tollgate_counter_limit"].samples
        assert limits[0].value == 200
    finally:
        gw.stop()
