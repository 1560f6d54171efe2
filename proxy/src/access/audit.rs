//! The audit log of temporary access: one JSON object per line (grant, extend, revoked,
//! expired, drop_pending, account_dropped, orphan_removed, login, login_failed, statement,
//! prepare, execute, change_user), each with the
//! time, the event, the user and the event's details. Also mirrored to the tracing log.

use crate::failover::controller::rfc3339;
use std::io::Write;
use std::sync::Mutex;

pub struct Audit {
    path: String,
    file: Mutex<std::fs::File>,
    /// Also sent as OTLP logs when the proxy exports telemetry.
    otlp: Option<tokio::sync::mpsc::Sender<crate::telemetry::LogEvent>>,
}

impl Audit {
    pub fn open(path: &str, otlp: Option<tokio::sync::mpsc::Sender<crate::telemetry::LogEvent>>) -> Result<Self, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(|e| format!("cannot open audit log {path}: {e}"))?;
        Ok(Self { path: path.to_string(), file: Mutex::new(file), otlp })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn event(&self, event: &str, user: &str, details: &[(&str, &str)]) {
        let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let mut obj = serde_json::Map::new();
        obj.insert("ts".into(), rfc3339(ms).into());
        obj.insert("event".into(), event.into());
        obj.insert("user".into(), user.into());
        for (k, v) in details {
            obj.insert((*k).into(), (*v).into());
        }
        let line = serde_json::Value::Object(obj).to_string();
        tracing::info!(target: "breakwater_proxy::audit", event, user, "{line}");
        if let Ok(mut f) = self.file.lock() {
            if let Err(e) = writeln!(f, "{line}") {
                tracing::warn!(path = %self.path, error = %e, "audit log write failed");
            }
        }
        if let Some(tx) = &self.otlp {
            let _ = tx.try_send(crate::telemetry::LogEvent {
                time_ns: ms * 1_000_000,
                event: event.to_string(),
                user: user.to_string(),
                details: details.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                body: line,
            });
        }
    }
}
