"""Start the real tollgate binary (built by scripts/test.sh) on free ports."""
import os
import subprocess
import tempfile
import time
import urllib.request
import json

import pytest

T0 = 1_800_000_000_000 - (1_800_000_000_000 % 86_400_000) + 8 * 3_600_000
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Gateway:
    def __init__(self, config_text: str):
        self.dir = tempfile.TemporaryDirectory()
        path = os.path.join(self.dir.name, "config.yaml")
        with open(path, "w") as f:
            f.write(config_text)
        binary = os.environ.get("TOLLGATE_BIN", os.path.join(ROOT, "target", "debug", "tollgate"))
        self.stderr = open(os.path.join(self.dir.name, "stderr.log"), "w+")
        self.proc = subprocess.Popen(
            [binary, "serve", "-c", path, "--listen", "127.0.0.1:0",
             "--admin-listen", "127.0.0.1:0", f"--test-clock={T0}"],
            stdout=subprocess.PIPE, stderr=self.stderr, text=True,
        )
        deadline = time.time() + 30
        line = ""
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("tollgate listening"):
                break
            if not line and self.proc.poll() is not None:
                break
        if not line.startswith("tollgate listening"):
            self.stderr.seek(0)
            raise RuntimeError("tollgate did not start: " + self.stderr.read())
        fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
        self.proxy = fields["proxy"]
        self.admin = fields["admin"]

    @property
    def base_url(self):
        return f"http://{self.proxy}/v1"

    def advance(self, ms: int):
        req = urllib.request.Request(
            f"http://{self.admin}/admin/test-clock",
            data=json.dumps({"advance_ms": ms}).encode(), method="POST")
        urllib.request.urlopen(req).read()

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.stderr.close()
        self.dir.cleanup()


@pytest.fixture
def quickstart():
    with open(os.path.join(ROOT, "examples", "quickstart.yaml")) as f:
        gw = Gateway(f.read())
    yield gw
    gw.stop()
