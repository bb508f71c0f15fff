//! Test harness: the real `tollgate` binary on port 0 with a test clock, and a real
//! upstream (the simulator crate on its own socket, counting what reaches it).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

/// Start of the test clock: a whole minute, hour and day (2027-01-15T08:00:00Z), so
/// tests know where window edges fall.
pub const T0: u64 = 1_800_000_000_000 - (1_800_000_000_000 % 86_400_000) + 8 * 3_600_000;

pub struct Gateway {
    pub child: Child,
    pub config_path: PathBuf,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub stderr_path: PathBuf,
    /// Everything the gateway printed on stdout (kept for tests that read it).
    stdout: Arc<std::sync::Mutex<String>>,
    _dir: tempdir::TempDir,
}

mod tempdir {
    /// Minimal temp dir (removed on drop) to avoid a dependency.
    pub struct TempDir(pub std::path::PathBuf);
    impl TempDir {
        pub fn new() -> Self {
            let p = std::env::temp_dir().join(format!(
                "tollgate-test-{}-{}",
                std::process::id(),
                rand_suffix()
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        t ^ (N.fetch_add(1, Ordering::Relaxed) << 48)
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tollgate")
}

impl Gateway {
    /// Start with `config` (its `listen`/`admin.listen` are overridden to port 0).
    pub fn start(config: &str) -> Self {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Self {
        Self::start_at(config, env, T0)
    }

    /// Start with the test clock at `t0` (Redis tests use a time near now, so the keys
    /// they leave on a shared server expire soon).
    pub fn start_at(config: &str, env: &[(&str, &str)], t0: u64) -> Self {
        let dir = tempdir::TempDir::new();
        let cfg = dir.0.join("config.yaml");
        std::fs::write(&cfg, config).unwrap();
        let args = vec!["-c".into(), cfg.into_os_string()];
        Self::launch(dir, &args, env, t0)
    }

    /// Start `serve` with these arguments (besides the listeners and the test clock).
    pub fn start_args(args: &[std::ffi::OsString], env: &[(&str, &str)], t0: u64) -> Self {
        Self::launch(tempdir::TempDir::new(), args, env, t0)
    }

    fn launch(
        dir: tempdir::TempDir,
        args: &[std::ffi::OsString],
        env: &[(&str, &str)],
        t0: u64,
    ) -> Self {
        let cfg = dir.0.join("config.yaml");
        let stderr_path = dir.0.join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .args(args)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg(format!("--test-clock={t0}"))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn tollgate");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut printed = String::new();
        let line = loop {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("tollgate listening") => break l,
                Some(Ok(l)) => {
                    printed.push_str(&l);
                    printed.push('\n');
                }
                _ => {
                    let _ = child.wait();
                    panic!(
                        "tollgate did not start:\n{}",
                        std::fs::read_to_string(&stderr_path).unwrap_or_default()
                    );
                }
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        let stdout = Arc::new(std::sync::Mutex::new(format!("{printed}{line}\n")));
        let sink = stdout.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&l);
                s.push('\n');
            }
        });
        let field = |name: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap()
                .parse()
                .unwrap()
        };
        Gateway {
            config_path: cfg.clone(),
            proxy: field("proxy"),
            admin: field("admin"),
            child,
            stderr_path,
            stdout,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub async fn set_clock(&self, ms: u64) {
        let r = client()
            .post(self.admin_url("/admin/test-clock"))
            .body(format!("{{\"set_ms\": {ms}}}"))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    pub async fn advance(&self, ms: u64) {
        let r = client()
            .post(self.admin_url("/admin/test-clock"))
            .body(format!("{{\"advance_ms\": {ms}}}"))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    pub async fn counters(&self, prefix: &str) -> Vec<serde_json::Value> {
        let v: serde_json::Value = client()
            .get(self.admin_url("/admin/counters"))
            .query(&[("prefix", prefix)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["counters"].as_array().cloned().unwrap_or_default()
    }

    /// Wait until all settlements for `prefix` are visible (settlement is asynchronous).
    pub async fn counter_value(&self, id: &str, window_start: Option<u64>) -> Option<u64> {
        self.counters(id)
            .await
            .iter()
            .find(|c| {
                c["id"] == id
                    && window_start
                        .map(|w| c["window_start"].as_u64() == Some(w))
                        .unwrap_or(true)
            })
            .and_then(|c| c["value"].as_u64())
    }

    /// Send a signal (`HUP`, `TERM`, …) to the gateway process.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Replace the config file the way editors and ConfigMaps do: write aside, rename.
    pub fn rewrite_config(&self, text: &str) {
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    pub async fn status(&self) -> serde_json::Value {
        client()
            .get(self.admin_url("/admin/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Wait (bounded) until the reload counter passes `n` — reloads are asynchronous.
    pub async fn wait_reloads(&self, n: u64) -> serde_json::Value {
        for _ in 0..250 {
            let st = self.status().await;
            if st["last_reload"]["reloads"].as_u64().unwrap_or(0) > n {
                return st;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no reload seen: {}", self.status().await);
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// What the gateway printed on stdout so far (start-up lines included).
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A simulator on its own socket, as a real upstream.
pub struct Upstream {
    pub addr: SocketAddr,
    pub sim: Arc<tollgate_sim::Simulator>,
}

impl Upstream {
    pub async fn start() -> Self {
        Self::start_paced(0).await
    }

    /// A simulator that takes `ms_per_token` per generated token.
    pub async fn start_paced(ms_per_token: u64) -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let sim = Arc::new(tollgate_sim::Simulator::new(tollgate_sim::SimConfig {
            model: "sim-model".into(),
            latency_ms: 0,
            ms_per_token,
            default_max_tokens: 16,
        }));
        tokio::spawn(tollgate_sim::serve(l, sim.clone()));
        Upstream { addr, sim }
    }

    pub fn served(&self) -> u64 {
        self.sim.requests_served()
    }
}

/// A backend named `up` pointing at `addr`, for [`quickstart_config`].
pub fn sim_backend(addr: SocketAddr) -> String {
    format!("  - name: up\n    url: http://{addr}\n")
}

/// The quickstart policies in front of `backend_yaml`.
pub fn quickstart_config(backends_yaml: &str) -> String {
    format!(
        r#"
listen: 127.0.0.1:0
backends:
{backends_yaml}
routes:
  - name: llm
    match: {{ path_prefix: /v1 }}
    backend: up
auth:
  api_keys:
    prefixes: [APIKEY, Bearer]
    keys:
      - key: iamafreeuser
        identity: {{ userid: user-1, groups: free }}
      - key: iamagolduser
        identity: {{ userid: user-2, groups: gold }}
policies:
  - name: trlp
    kind: TokenRateLimitPolicy
    target: gateway
    limits:
      free:
        rates: [{{ limit: 50, window: 1m }}]
        when:
          - request.path == "/v1/chat/completions"
          - auth.identity.groups.split(",").exists(g, g == "free")
        counters: [auth.identity.userid]
      gold:
        rates: [{{ limit: 200, window: 1m }}]
        when:
          - request.path == "/v1/chat/completions"
          - auth.identity.groups.split(",").exists(g, g == "gold")
        counters: [auth.identity.userid]
"#
    )
}

pub fn chat_body(max_tokens: u64) -> serde_json::Value {
    serde_json::json!({
        "model": "sim-model",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": max_tokens,
    })
}

pub fn write_stdin(child: &mut Child, s: &str) {
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(s.as_bytes());
    }
}
