//! Hot reload: the config file is watched (its directory, so the symlink swap Kubernetes
//! ConfigMaps do is seen too) and re-read on SIGHUP. A valid new config is compiled into
//! a new runtime and swapped in atomically; an invalid one is refused, the old runtime
//! keeps serving, and the reason is logged, counted and shown in `/admin/status`.
//! Counters live in the store, keyed by policy and limit names, so limits that still
//! exist keep their spend. The TLS certificate and key (`server.tls`) are re-read on
//! every reload, and a change to them is seen like a change to the config: new
//! connections get the new certificate. Listen addresses and the storage kind need a
//! restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use crate::config;
use crate::proxy::Gateway;
use crate::runtime::Runtime;

/// Re-read `path`; swap on success. Returns the problems when refused.
pub fn reload(gw: &Gateway, path: &Path) -> Result<(), String> {
    let built = config::read(path).and_then(|(_, cfg, idx)| Runtime::build(cfg, &idx));
    match built {
        Ok((rt, warnings)) => {
            for w in &warnings {
                tracing::warn!("{}: {w}", path.display());
            }
            let old = gw.runtime.load();
            if rt.listen != old.listen || rt.admin_listen != old.admin_listen {
                tracing::warn!(
                    "listen addresses changed in the config; they take effect on restart"
                );
            }
            if rt.config.storage.kind != old.config.storage.kind {
                tracing::warn!("storage kind changed in the config; it takes effect on restart");
            }
            if let Some(j) = &rt.jwt {
                j.spawn_refresh();
            }
            gw.swap_runtime(rt);
            tracing::info!(config = %path.display(), "configuration reloaded");
            Ok(())
        }
        Err(problems) => {
            let msg = problems
                .iter()
                .filter(|p| p.severity == config::Severity::Error)
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            tracing::error!(config = %path.display(), error = %msg, "configuration refused; the previous one keeps serving");
            gw.record_reload(Some(msg.clone()));
            Err(msg)
        }
    }
}

/// The config file's digest, with the TLS certificate and key it names (so a rotated
/// certificate next to the config is picked up like an edit of the config).
fn digest(path: &Path) -> Option<[u8; 32]> {
    let text = std::fs::read(path).ok()?;
    let mut h = Sha256::new();
    h.update(&text);
    let tls = std::str::from_utf8(&text)
        .ok()
        .and_then(|t| config::parse(t).ok())
        .and_then(|(cfg, _)| cfg.server.tls);
    if let Some(tls) = tls {
        for f in [&tls.cert_file, &tls.key_file] {
            h.update(std::fs::read(f).unwrap_or_default());
        }
    }
    Some(h.finalize().into())
}

/// SIGHUP and file-change triggers, until `shutdown` flips.
pub fn spawn(gw: Arc<Gateway>, path: PathBuf, mut shutdown: watch::Receiver<bool>) {
    let (tx, mut rx) = mpsc::channel::<&'static str>(16);

    #[cfg(unix)]
    {
        let tx = tx.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                tracing::warn!("cannot listen for SIGHUP; reload by file change only");
                return;
            };
            loop {
                tokio::select! {
                    _ = hup.recv() => { let _ = tx.send("sighup").await; }
                    _ = shutdown.changed() => break,
                }
            }
        });
    }

    // Watch the directory: editors and Kubernetes replace the file (rename/symlink swap)
    // rather than writing it in place.
    let watcher = {
        use notify::{RecursiveMode, Watcher};
        let tx = tx.clone();
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let name = path.file_name().map(|n| n.to_os_string());
        match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Only what can change the config: the file itself, Kubernetes' atomic-writer
            // entries (`..data`, `..2024_…`), or any PEM file (a rotated certificate).
            // Other files in the directory (logs, say) cost nothing.
            let relevant = |p: &PathBuf| {
                let Some(f) = p.file_name() else {
                    return true;
                };
                Some(f) == name.as_deref()
                    || f.to_string_lossy().starts_with("..")
                    || p.extension()
                        .is_some_and(|e| matches!(e.to_str(), Some("pem" | "crt" | "key" | "cert")))
            };
            // Opening or reading a file is no change; without this, reading the config
            // here (an open event on it) would wake the reloader again, forever.
            let changes = |kind: &notify::EventKind| {
                use notify::event::{AccessKind, AccessMode, EventKind};
                match kind {
                    EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                    EventKind::Access(_) => false,
                    _ => true,
                }
            };
            if let Ok(ev) = res {
                if changes(&ev.kind) && (ev.paths.is_empty() || ev.paths.iter().any(relevant)) {
                    let _ = tx.try_send("file");
                }
            }
        }) {
            Ok(mut w) => match w.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the config directory; reload on SIGHUP only");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "no file watcher; reload on SIGHUP only");
                None
            }
        }
    };

    tokio::spawn(async move {
        let _watcher = watcher; // dropped (and stopped) with this task
        let mut last = digest(&path);
        loop {
            let mut why = tokio::select! {
                w = rx.recv() => match w { Some(w) => w, None => break },
                _ = shutdown.changed() => break,
            };
            // Debounce: a save is often several events; read once things settle. A SIGHUP
            // among them still forces the reload.
            tokio::time::sleep(Duration::from_millis(150)).await;
            while let Ok(w) = rx.try_recv() {
                if w == "sighup" {
                    why = w;
                }
            }
            let now = digest(&path);
            gw.record_config_check();
            if why == "file" && now == last {
                continue;
            }
            if now.is_none() {
                tracing::warn!(config = %path.display(), "config file missing; keeping the current configuration");
                continue;
            }
            last = now;
            let _ = reload(&gw, &path);
        }
    });
}
