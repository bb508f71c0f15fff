"""The admin dashboard in a real headless Chromium.

Against the real gateway (quickstart policies, test clock): the page shows every
counter with the value /admin/counters reports, follows new traffic without a reload,
counts reset time on the server's clock, and passes ?token= on as the admin bearer
token. Against a small stub of the admin API, because the real one cannot be made to
fail and come back on the same port: the error banner appears when the API fails and
goes away when it answers again.

Writes bench/out/dashboard.png (1280x800) for a person to look at."""
import json
import os
import re
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from selenium.webdriver.common.by import By

from browser import headless_chromium, wait_until
from conftest import ROOT, T0, Gateway

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
FREE = "trlp-tutorial-token-limits/free/60000/user-1"
GOLD = "trlp-tutorial-token-limits/gold/60000/user-2"
DASHBOARD_HTML = os.path.join(ROOT, "crates", "tollgate", "src", "admin", "dashboard.html")
SCREENSHOT = os.path.join(ROOT, "bench", "out", "dashboard.png")


def chat(gw, key, max_tokens):
    req = urllib.request.Request(
        f"http://{gw.proxy}/v1/chat/completions",
        data=json.dumps({"model": MODEL, "max_tokens": max_tokens,
                         "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"authorization": f"APIKEY {key}", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)["usage"]["total_tokens"]


def admin_json(gw, path):
    with urllib.request.urlopen(f"http://{gw.admin}{path}", timeout=10) as r:
        return json.load(r)


def counter_values(gw):
    return {c["id"]: c for c in admin_json(gw, "/admin/counters")["counters"]}


def row_attrs(driver, counter_id):
    """(data-value, data-limit) of the counter's row, or None while it is not shown."""
    rows = driver.find_elements(By.CSS_SELECTOR, f'tr[data-counter-id="{counter_id}"]')
    if not rows:
        return None
    return int(rows[0].get_attribute("data-value")), int(rows[0].get_attribute("data-limit"))


def chart_totals(driver):
    chart = driver.find_element(By.ID, "history-chart")
    return tuple(int(chart.get_attribute(f"data-{k}") or -1) for k in ("buckets", "allowed", "limited"))


def reset_seconds(driver, counter_id):
    text = driver.find_element(
        By.CSS_SELECTOR, f'tr[data-counter-id="{counter_id}"] td.reset').text
    m = re.fullmatch(r"(?:(\d+)m )?(\d+)s", text)
    assert m, f"reset countdown {text!r}"
    return int(m.group(1) or 0) * 60 + int(m.group(2))


def test_dashboard_follows_real_gateway(quickstart):
    gw = quickstart
    spent_free = sum(chat(gw, "iamafreeuser", 5) for _ in range(2))
    spent_gold = sum(chat(gw, "iamagolduser", 10) for _ in range(3))
    want = counter_values(gw)
    assert want[FREE]["value"] == spent_free and want[GOLD]["value"] == spent_gold

    with headless_chromium() as driver:
        driver.get(f"http://{gw.admin}/dashboard")
        wait_until(lambda: row_attrs(driver, FREE) == (spent_free, 50)
                   and row_attrs(driver, GOLD) == (spent_gold, 200),
                   what="free and gold counter rows with the values /admin/counters reports",
                   driver=driver)

        # Everything /admin/counters lists is on the page, with the same numbers.
        for cid, c in want.items():
            assert row_attrs(driver, cid) == (c["value"], c["limit"]), cid
        status = admin_json(gw, "/admin/status")
        assert driver.find_element(By.ID, "store-state").text == status["store"]["state"] == "healthy"
        wait_until(lambda: driver.find_element(By.ID, "allowed-total").text
                   == f'{admin_json(gw, "/admin/status")["requests"]["allowed"]:,}',
                   what="allowed total matching /admin/status")
        assert driver.find_element(By.ID, "limited-total").text == "0"
        assert driver.find_element(By.ID, "version").text == status["version"]
        assert driver.find_element(By.ID, "error-banner").is_displayed() is False
        top = driver.find_elements(By.CSS_SELECTOR, "#top-consumers tbody tr")
        assert 1 <= len(top) <= 10

        # The test clock stands at a minute boundary: a full minute to the reset. Moving
        # the server's clock moves the countdown, whatever the browser's clock says.
        assert 50 <= reset_seconds(driver, FREE) <= 60
        gw.advance(40_000)
        wait_until(lambda: reset_seconds(driver, FREE) <= 20, what="countdown on the server clock")

        # New traffic shows up without a reload; the free user runs into its limit.
        driver.execute_script("window.__sameDocument = true")
        updated = driver.find_element(By.ID, "last-updated").get_attribute("data-updated-ms")
        limited = 0
        for _ in range(10):
            try:
                spent_free += chat(gw, "iamafreeuser", 10)
            except urllib.error.HTTPError as e:
                assert e.code == 429
                limited += 1
                break
        spent_gold += chat(gw, "iamagolduser", 20)
        assert limited == 1
        want = counter_values(gw)
        assert want[FREE]["value"] == spent_free >= 50
        wait_until(lambda: row_attrs(driver, FREE) == (spent_free, 50)
                   and row_attrs(driver, GOLD) == (spent_gold, 200),
                   what="rows following new traffic", driver=driver)
        assert driver.execute_script("return window.__sameDocument") is True
        assert driver.find_element(By.ID, "last-updated").get_attribute("data-updated-ms") != updated
        wait_until(lambda: driver.find_element(By.ID, "limited-total").text == "1",
                   what="limited total 1")
        history = admin_json(gw, "/admin/status")["history"]
        wait_until(lambda: chart_totals(driver) == (
            len(history), sum(h["allowed"] for h in history), sum(h["limited"] for h in history)),
            what="history chart drawn from /admin/status", driver=driver)
        full = driver.find_element(By.CSS_SELECTOR, f'tr[data-counter-id="{FREE}"]')
        assert "full" in full.get_attribute("class").split()
        assert full.find_element(By.CSS_SELECTOR, "td.remaining").text == "0"

        os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
        assert driver.save_screenshot(SCREENSHOT)


def test_dashboard_sends_admin_token(tmp_path):
    token_file = tmp_path / "admin-token"
    token_file.write_text("s3cret-admin\n")
    with open(os.path.join(ROOT, "examples", "quickstart.yaml")) as f:
        config = f.read().replace("\nadmin:\n", f"\nadmin:\n  token_file: {token_file}\n", 1)
    gw = Gateway(config)
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            admin_json(gw, "/admin/counters")
        assert refused.value.code == 401
        spent = chat(gw, "iamafreeuser", 5)
        with headless_chromium() as driver:
            driver.get(f"http://{gw.admin}/dashboard")
            banner = driver.find_element(By.ID, "error-banner")
            wait_until(lambda: banner.is_displayed() and "?token=" in banner.text,
                       what="banner asking for ?token=", driver=driver)
            assert row_attrs(driver, FREE) is None

            driver.get(f"http://{gw.admin}/dashboard?token=s3cret-admin")
            wait_until(lambda: row_attrs(driver, FREE) == (spent, 50),
                       what="free counter row with the token", driver=driver)
            assert not driver.find_element(By.ID, "error-banner").is_displayed()
    finally:
        gw.stop()


class StubAdmin:
    """The admin API's three endpoints with canned data, and the real dashboard file.
    `failing` makes every API call answer 503."""

    def __init__(self):
        self.failing = False
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path in ("/", "/dashboard"):
                    with open(DASHBOARD_HTML, "rb") as f:
                        return self.send(200, f.read(), "text/html; charset=utf-8")
                if stub.failing:
                    return self.json(503, {"error": {"message": "store unreachable"}})
                body = stub.answers().get(path)
                if body is None:
                    return self.json(404, {"error": {"message": "no such admin endpoint"}})
                self.json(200, body)

            def json(self, code, obj):
                self.send(code, json.dumps(obj).encode(), "application/json")

            def send(self, code, body, ctype):
                self.send_response(code)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answers(self):
        now = T0 + 15_000
        odd = "p/per%2Fteam/3600000/team%2Fa%25b"  # escaped "/" and "%" in limit and key
        return {
            "/admin/counters": {"now_ms": now, "counters": [
                {"id": "p/hourly/3600000/alice", "kind": "tokens", "limit": 1000, "value": 700,
                 "reserved": 150, "remaining": 150, "window_start": T0, "reset_at": T0 + 3_600_000},
                {"id": odd, "kind": "requests", "limit": 10, "value": 3, "reserved": 0,
                 "remaining": 7, "window_start": T0, "reset_at": T0 + 3_600_000},
            ]},
            "/admin/status": {
                "version": "0.1.0", "uptime_s": 75, "now_ms": now,
                "store": {"kind": "redis", "state": "degraded", "detail": "connection refused"},
                "last_reload": {"ok": False, "at_ms": now - 5_000, "error": "line 3: unknown key"},
                "requests": {"allowed": 12345, "limited": 6, "unauth": 1, "forbidden": 0, "error": 2},
                "history": [{"at_ms": now - (59 - i) * 10_000, "allowed": i % 7, "limited": int(i % 3 == 0)}
                            for i in range(60)],
            },
            "/admin/usage": {"since_ms": T0, "identities": [
                {"identity": "alice", "policy": "p", "model": "m", "input_tokens": 500,
                 "output_tokens": 200, "total_tokens": 700, "requests": 4}]},
        }

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_admin():
    stub = StubAdmin()
    yield stub
    stub.stop()


def test_dashboard_error_banner_comes_and_goes(stub_admin):
    with headless_chromium() as driver:
        driver.get(f"http://{stub_admin.addr}/dashboard")
        wait_until(lambda: row_attrs(driver, "p/hourly/3600000/alice") == (700, 1000),
                   what="stub counter row", driver=driver)
        banner = driver.find_element(By.ID, "error-banner")
        assert not banner.is_displayed()
        odd = driver.find_element(By.CSS_SELECTOR, 'tr[data-counter-id="p/per%2Fteam/3600000/team%2Fa%25b"]')
        assert odd.find_element(By.CSS_SELECTOR, "td.key").text == "team/a%b"
        assert driver.find_element(By.ID, "store-state").text == "degraded"
        assert driver.find_element(By.ID, "allowed-total").text == "12,345"
        assert "line 3: unknown key" in driver.find_element(By.ID, "last-reload").text
        assert driver.find_element(By.CSS_SELECTOR, '#top-consumers tr[data-identity="alice"]')

        stub_admin.failing = True
        wait_until(banner.is_displayed, what="error banner")
        assert "503" in banner.text and "store unreachable" in banner.text
        # The last good data stays on the page, marked stale.
        assert row_attrs(driver, "p/hourly/3600000/alice") == (700, 1000)
        assert "stale" in driver.find_element(By.TAG_NAME, "body").get_attribute("class")

        stub_admin.failing = False
        wait_until(lambda: not banner.is_displayed(), what="banner gone after recovery")
        assert "stale" not in driver.find_element(By.TAG_NAME, "body").get_attribute("class")
