//! Hot reload: the config file is watched (its directory, so the symlink swap Kubernetes
//! ConfigMaps do is seen too) and re-read on SIGHUP; so are manifests (`--manifests`:
//! each file's directory, and each folder's `.yaml`/`.yml` files), which are translated
//! again. A valid new config is compiled into a new runtime and swapped in atomically; an
//! invalid one is refused, the old runtime keeps serving, and the reason is logged,
//! counted and shown in `/admin/status`. Counters live in the store, keyed by policy and
//! limit names, so limits that still exist keep their spend. The TLS certificate and key
//! (`server.tls`) are re-read on every reload, and a change to them is seen like a change
//! to the config: new connections get the new certificate. Listen addresses, the storage
//! kind and `--backend`/`--backends-file` need a restart.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use crate::config;
use crate::proxy::Gateway;
use crate::runtime::Runtime;

type Build =
    dyn Fn() -> Result<(Runtime, Vec<config::Problem>), Vec<config::Problem>> + Send + Sync;

/// What the runtime is built from, and how to build it again.
pub struct Source {
    /// The native config file, if any.
    pub config: Option<PathBuf>,
    /// Manifest files and folders (`--manifests`).
    pub manifests: Vec<PathBuf>,
    /// Reads the files as they are now and compiles a runtime (translating manifests).
    pub build: Box<Build>,
}

impl Source {
    /// What to name in messages.
    fn label(&self) -> String {
        match (&self.config, self.manifests.first()) {
            (Some(c), _) => c.display().to_string(),
            (None, Some(m)) => m.display().to_string(),
            (None, None) => "-".into(),
        }
    }
}

/// Build the runtime from `source` again; swap on success. Returns the problems when
/// refused.
pub fn reload(gw: &Gateway, source: &Source) -> Result<(), String> {
    let label = source.label();
    match (source.build)() {
        Ok((rt, warnings)) => {
            for w in &warnings {
                tracing::warn!("{label}: {w}");
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
            tracing::info!(config = %label, "configuration reloaded");
            Ok(())
        }
        Err(problems) => {
            let msg = problems
                .iter()
                .filter(|p| p.severity == config::Severity::Error)
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            tracing::error!(config = %label, error = %msg, "configuration refused; the previous one keeps serving");
            gw.record_reload(Some(msg.clone()));
            Err(msg)
        }
    }
}

/// The config file's digest, with the TLS certificate and key it names (so a rotated
/// certificate next to the config is picked up like an edit of the config), and every
/// manifest (a folder's by name and content). `None` when a file is missing.
fn digest(source: &Source) -> Option<[u8; 32]> {
    let mut h = Sha256::new();
    if let Some(path) = &source.config {
        let text = std::fs::read(path).ok()?;
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
    }
    for m in &source.manifests {
        if m.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(m)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| is_manifest(f))
                .collect();
            files.sort();
            for f in files {
                h.update(f.as_os_str().as_encoded_bytes());
                h.update(std::fs::read(&f).unwrap_or_default());
            }
        } else {
            h.update(std::fs::read(m).ok()?);
        }
    }
    Some(h.finalize().into())
}

/// A file a manifest folder is read for (as `manifests::load` does).
fn is_manifest(p: &Path) -> bool {
    p.extension()
        .and_then(|x| x.to_str())
        .is_some_and(|x| x == "yaml" || x == "yml")
}

/// What a watched directory is watched for.
#[derive(Debug, Clone)]
enum Wanted {
    /// One file in it (the config, or a manifest file).
    File(OsString),
    /// Every `.yaml`/`.yml` file in it (a manifest folder).
    Manifests,
}

/// The directories to watch, each with what in it matters.
fn watch_list(source: &Source) -> Vec<(PathBuf, Wanted)> {
    let parent_of = |p: &Path| {
        p.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    };
    let file = |p: &Path| {
        p.file_name()
            .map(|n| (parent_of(p), Wanted::File(n.to_os_string())))
    };
    let mut out: Vec<(PathBuf, Wanted)> = source.config.iter().filter_map(|c| file(c)).collect();
    for m in &source.manifests {
        if m.is_dir() {
            out.push((m.clone(), Wanted::Manifests));
        } else if let Some(f) = file(m) {
            out.push(f);
        }
    }
    out
}

/// SIGHUP and file-change triggers, until `shutdown` flips.
pub fn spawn(gw: Arc<Gateway>, source: Source, mut shutdown: watch::Receiver<bool>) {
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

    // Watch directories, not files: editors and Kubernetes replace a file (rename or
    // symlink swap) rather than writing it in place.
    let wanted = watch_list(&source);
    let watcher = {
        use notify::{RecursiveMode, Watcher};
        let tx = tx.clone();
        let rules = wanted.clone();
        match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Only what can change the config: the files themselves, a manifest folder's
            // YAML files, Kubernetes' atomic-writer entries (`..data`, `..2024_…`), or any
            // PEM file (a rotated certificate). Other files in these directories (logs,
            // say) cost nothing.
            let relevant = |p: &PathBuf| {
                let Some(f) = p.file_name() else {
                    return true;
                };
                f.to_string_lossy().starts_with("..")
                    || p.extension()
                        .is_some_and(|e| matches!(e.to_str(), Some("pem" | "crt" | "key" | "cert")))
                    || rules.iter().any(|(dir, w)| match w {
                        Wanted::File(name) => f == name.as_os_str(),
                        Wanted::Manifests => is_manifest(p) && p.parent() == Some(dir.as_path()),
                    })
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
            Ok(mut w) => {
                let mut dirs: Vec<&PathBuf> = wanted.iter().map(|(d, _)| d).collect();
                dirs.sort();
                dirs.dedup();
                let mut watching = 0;
                for dir in dirs {
                    match w.watch(dir, RecursiveMode::NonRecursive) {
                        Ok(()) => watching += 1,
                        Err(e) => {
                            tracing::warn!(error = %e, dir = %dir.display(), "cannot watch this directory; changes there reload on SIGHUP only")
                        }
                    }
                }
                (watching > 0).then_some(w)
            }
            Err(e) => {
                tracing::warn!(error = %e, "no file watcher; reload on SIGHUP only");
                None
            }
        }
    };

    tokio::spawn(async move {
        let _watcher = watcher; // dropped (and stopped) with this task
        let mut last = digest(&source);
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
            let now = digest(&source);
            gw.record_config_check();
            if why == "file" && now == last {
                continue;
            }
            if now.is_none() {
                tracing::warn!(config = %source.label(), "a config or manifest file is missing; keeping the current configuration");
                continue;
            }
            last = now;
            let _ = reload(&gw, &source);
        }
    });
}
