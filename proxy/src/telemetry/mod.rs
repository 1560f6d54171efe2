//! OpenTelemetry export of the proxy: one span per sampled client query (semantic-convention
//! attributes: db.system.name, db.operation.name, db.namespace, db.query.summary,
//! server.address/port of the backend, plus breakwater.hostgroup and breakwater.cache),
//! the proxy's counters as OTLP metrics, and the temporary-access audit events as OTLP logs;
//! over OTLP/gRPC and/or OTLP/HTTP (protobuf).
//!
//! Sessions hand finished spans to a bounded queue without waiting; an exporter task sends
//! them in batches every `export_interval_ms`. A full queue drops spans and counts them.

use crate::config::TelemetryConfig;
use crate::runtime::Proxy;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, AggregationTemporality, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status, ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tracing::warn;

/// One client query, as the session saw it.
pub struct SpanRecord {
    pub start_ns: u64,
    pub end_ns: u64,
    pub operation: &'static str,
    pub schema: Option<String>,
    pub summary: String,
    pub user: String,
    /// -1: answered from the query cache.
    pub hostgroup: i64,
    pub backend: Option<Arc<str>>,
    /// hit, miss or none (not cacheable).
    pub cache: &'static str,
    pub error: Option<u16>,
    pub rows: u64,
}

/// An audit event (temporary access) for OTLP logs.
pub struct LogEvent {
    pub time_ns: u64,
    pub event: String,
    pub user: String,
    pub details: Vec<(String, String)>,
    /// The JSON line, as the body.
    pub body: String,
}

pub struct Telemetry {
    tx: Option<mpsc::Sender<SpanRecord>>,
    log_tx: Option<mpsc::Sender<LogEvent>>,
    ratio: f64,
    pub dropped: AtomicU64,
    pub exported: AtomicU64,
    pub export_errors: AtomicU64,
}

pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn kv(k: &str, v: any_value::Value) -> KeyValue {
    KeyValue { key: k.to_string(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
}

fn s(v: impl Into<String>) -> any_value::Value {
    any_value::Value::StringValue(v.into())
}

fn i(v: i64) -> any_value::Value {
    any_value::Value::IntValue(v)
}

impl Telemetry {
    /// Disabled unless an endpoint is configured; the exporter starts with [`spawn`].
    pub fn new(cfg: &TelemetryConfig) -> (Self, Option<Receivers>) {
        let enabled = !cfg.otlp_endpoint.is_empty() || !cfg.otlp_http_endpoint.is_empty();
        let (tx, log_tx, rx) = if enabled {
            let (tx, rx) = mpsc::channel(cfg.max_queued_spans.max(1));
            let (log_tx, log_rx) = mpsc::channel(cfg.max_queued_spans.max(1));
            (Some(tx), Some(log_tx), Some(Receivers { spans: rx, logs: log_rx }))
        } else {
            (None, None, None)
        };
        let t = Self { tx, log_tx, ratio: cfg.trace_sample_ratio.clamp(0.0, 1.0), dropped: AtomicU64::new(0), exported: AtomicU64::new(0), export_errors: AtomicU64::new(0) };
        (t, rx)
    }

    /// Whether to trace this query (cheap when tracing is off).
    pub fn sample(&self) -> bool {
        self.tx.is_some() && self.ratio > 0.0 && (self.ratio >= 1.0 || rand::random::<f64>() < self.ratio)
    }

    /// Where audit events go as OTLP logs (None when no endpoint is configured).
    pub fn log_sender(&self) -> Option<mpsc::Sender<LogEvent>> {
        self.log_tx.clone()
    }

    pub fn record(&self, span: SpanRecord) {
        if let Some(tx) = &self.tx {
            if tx.try_send(span).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn resource(cfg: &TelemetryConfig) -> Resource {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    Resource { attributes: vec![kv("service.name", s(cfg.service_name.clone())), kv("host.name", s(host))], ..Default::default() }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope { name: "breakwater-proxy".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() }
}

fn to_span(r: SpanRecord) -> Span {
    let trace_id: [u8; 16] = rand::random();
    let span_id: [u8; 8] = rand::random();
    let name = match &r.schema {
        Some(db) => format!("{} {db}", r.operation),
        None => r.operation.to_string(),
    };
    let mut attributes = vec![
        kv("db.system.name", s("mysql")),
        kv("db.operation.name", s(r.operation)),
        kv("db.query.summary", s(r.summary)),
        kv("db.user", s(r.user)),
        kv("breakwater.hostgroup", i(r.hostgroup)),
        kv("breakwater.cache", s(r.cache)),
        kv("db.response.returned_rows", i(r.rows as i64)),
    ];
    if let Some(db) = r.schema {
        attributes.push(kv("db.namespace", s(db)));
    }
    if let Some(b) = &r.backend {
        let (h, p) = b.rsplit_once(':').unwrap_or((b, "0"));
        attributes.push(kv("server.address", s(h)));
        attributes.push(kv("server.port", i(p.parse().unwrap_or(0))));
    }
    let status = match r.error {
        Some(code) => {
            attributes.push(kv("db.response.status_code", s(code.to_string())));
            attributes.push(kv("error.type", s(code.to_string())));
            Status { code: status::StatusCode::Error as i32, message: format!("MySQL error {code}") }
        }
        None => Status::default(),
    };
    Span {
        trace_id: trace_id.to_vec(),
        span_id: span_id.to_vec(),
        name,
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: r.start_ns,
        end_time_unix_nano: r.end_ns.max(r.start_ns),
        attributes,
        status: Some(status),
        ..Default::default()
    }
}

fn metrics_request(proxy: &Proxy, res: &Resource, start: u64) -> ExportMetricsServiceRequest {
    let now = now_ns();
    let sum = |name: &str, unit: &str, desc: &str, monotonic: bool, points: Vec<(Vec<KeyValue>, u64)>| Metric {
        name: name.into(),
        description: desc.into(),
        unit: unit.into(),
        data: Some(metric::Data::Sum(Sum {
            data_points: points
                .into_iter()
                .map(|(attributes, v)| NumberDataPoint {
                    attributes,
                    start_time_unix_nano: start,
                    time_unix_nano: now,
                    value: Some(number_data_point::Value::AsInt(v as i64)),
                    ..Default::default()
                })
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: monotonic,
        })),
        ..Default::default()
    };
    let sys = || kv("db.system.name", s("mysql"));
    let st = &proxy.stats;
    let c = proxy.cache.stats();
    let servers = proxy.rt.servers();
    let per_server = |f: &dyn Fn(&crate::backend::server::Server) -> u64| -> Vec<(Vec<KeyValue>, u64)> {
        servers
            .iter()
            .map(|x| {
                let (h, p) = x.addr.rsplit_once(':').unwrap_or((&x.addr, "0"));
                (
                    vec![sys(), kv("server.address", s(h)), kv("server.port", i(p.parse().unwrap_or(0))), kv("breakwater.hostgroup", i(x.cfg.hostgroup as i64))],
                    f(x),
                )
            })
            .collect()
    };
    let metrics = vec![
        sum("breakwater.proxy.client.connections", "{connection}", "Client connections accepted.", true, vec![(vec![sys()], st.client_connections.load(Ordering::Relaxed))]),
        sum("breakwater.proxy.backend.commands", "{command}", "Commands sent to each backend server entry.", true, per_server(&|x| x.counters.queries.load(Ordering::Relaxed))),
        sum("breakwater.proxy.backend.connections.in_use", "{connection}", "Backend connections checked out now.", false, per_server(&|x| x.pool.in_use.load(Ordering::Relaxed) as u64)),
        sum(
            "breakwater.proxy.cache.lookups",
            "{lookup}",
            "Query cache lookups by result.",
            true,
            vec![
                (vec![sys(), kv("breakwater.cache.result", s("hit"))], c.hits + c.stale_hits),
                (vec![sys(), kv("breakwater.cache.result", s("miss"))], c.misses),
            ],
        ),
        sum("breakwater.proxy.cache.bytes", "By", "Bytes held by the query cache.", false, vec![(vec![sys()], c.bytes as u64)]),
        sum("breakwater.proxy.spans.dropped", "{span}", "Spans dropped because the export queue was full.", true, vec![(vec![sys()], proxy.telemetry.dropped.load(Ordering::Relaxed))]),
    ];
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(res.clone()),
            scope_metrics: vec![ScopeMetrics { scope: Some(scope()), metrics, ..Default::default() }],
            ..Default::default()
        }],
    }
}

/// The exporter's ends of the span and log queues.
pub struct Receivers {
    pub spans: mpsc::Receiver<SpanRecord>,
    pub logs: mpsc::Receiver<LogEvent>,
}

fn to_log(e: LogEvent) -> LogRecord {
    let mut attributes = vec![kv("event.name", s(format!("breakwater.access.{}", e.event))), kv("user.name", s(e.user))];
    attributes.extend(e.details.into_iter().map(|(k, v)| kv(&format!("breakwater.access.{k}"), s(v))));
    LogRecord {
        time_unix_nano: e.time_ns,
        observed_time_unix_nano: e.time_ns,
        severity_number: 9, // INFO
        severity_text: "INFO".into(),
        body: Some(AnyValue { value: Some(s(e.body)) }),
        attributes,
        ..Default::default()
    }
}

/// Start the exporter (holds the proxy weakly; stops on shutdown).
pub fn spawn(proxy: &Arc<Proxy>, rx: Option<Receivers>, mut shutdown: watch::Receiver<bool>) {
    let Some(Receivers { spans: mut rx, logs: mut log_rx }) = rx else { return };
    let cfg = proxy.rt.cfg.telemetry.clone();
    let weak: Weak<Proxy> = Arc::downgrade(proxy);
    tokio::spawn(async move {
        let res = resource(&cfg);
        let start = now_ns();
        let interval = Duration::from_millis(cfg.export_interval_ms.max(100));
        loop {
            let stop = tokio::select! {
                _ = tokio::time::sleep(interval) => false,
                _ = shutdown.changed() => true,
            };
            let Some(proxy) = weak.upgrade() else { break };
            let mut spans = Vec::new();
            while spans.len() < 4096 {
                match rx.try_recv() {
                    Ok(r) => spans.push(to_span(r)),
                    Err(_) => break,
                }
            }
            let n = spans.len() as u64;
            let traces = (!spans.is_empty()).then(|| ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    resource: Some(res.clone()),
                    scope_spans: vec![ScopeSpans { scope: Some(scope()), spans, ..Default::default() }],
                    ..Default::default()
                }],
            });
            let metrics = metrics_request(&proxy, &res, start);
            let mut records = Vec::new();
            while records.len() < 4096 {
                match log_rx.try_recv() {
                    Ok(e) => records.push(to_log(e)),
                    Err(_) => break,
                }
            }
            let logs = (!records.is_empty()).then(|| ExportLogsServiceRequest {
                resource_logs: vec![ResourceLogs {
                    resource: Some(res.clone()),
                    scope_logs: vec![ScopeLogs { scope: Some(scope()), log_records: records, ..Default::default() }],
                    ..Default::default()
                }],
            });
            let mut ok = true;
            if !cfg.otlp_endpoint.is_empty() {
                ok &= send_grpc(&cfg.otlp_endpoint, traces.clone(), metrics.clone(), logs.clone()).await.map_err(|e| warn!(error = %e, "OTLP/gRPC export failed")).is_ok();
            }
            if !cfg.otlp_http_endpoint.is_empty() {
                let base = cfg.otlp_http_endpoint.trim_end_matches('/');
                if let Some(t) = &traces {
                    ok &= send_http(&format!("{base}/v1/traces"), t.encode_to_vec()).await.map_err(|e| warn!(error = %e, "OTLP/HTTP trace export failed")).is_ok();
                }
                if let Some(l) = &logs {
                    ok &= send_http(&format!("{base}/v1/logs"), l.encode_to_vec()).await.map_err(|e| warn!(error = %e, "OTLP/HTTP log export failed")).is_ok();
                }
                ok &= send_http(&format!("{base}/v1/metrics"), metrics.encode_to_vec()).await.map_err(|e| warn!(error = %e, "OTLP/HTTP metric export failed")).is_ok();
            }
            if ok {
                proxy.telemetry.exported.fetch_add(n, Ordering::Relaxed);
            } else {
                proxy.telemetry.export_errors.fetch_add(1, Ordering::Relaxed);
            }
            if stop {
                break;
            }
        }
    });
}

async fn send_grpc(
    endpoint: &str,
    traces: Option<ExportTraceServiceRequest>,
    metrics: ExportMetricsServiceRequest,
    logs: Option<ExportLogsServiceRequest>,
) -> Result<(), String> {
    let fut = async {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string()).map_err(|e| e.to_string())?.connect().await.map_err(|e| e.to_string())?;
        if let Some(t) = traces {
            TraceServiceClient::new(channel.clone()).export(t).await.map_err(|e| e.to_string())?;
        }
        if let Some(l) = logs {
            LogsServiceClient::new(channel.clone()).export(l).await.map_err(|e| e.to_string())?;
        }
        MetricsServiceClient::new(channel).export(metrics).await.map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    };
    tokio::time::timeout(Duration::from_secs(10), fut).await.map_err(|_| "timed out".to_string())?
}

/// POST a protobuf body to a plain http:// URL.
async fn send_http(url: &str, body: Vec<u8>) -> Result<(), String> {
    breakwater_otlp_http::post_protobuf(url, "/", &body, Duration::from_secs(10)).await
}
