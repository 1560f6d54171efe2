//! OTLP metrics export (gRPC and HTTP/protobuf): every interval the agent's cumulative
//! statistics become one ExportMetricsServiceRequest, with OpenTelemetry semantic-convention
//! attributes (db.system.name, db.operation.name, server.port, client.address,
//! network.io.direction) and a resource naming the host.

use crate::stats::{Stats, BUCKETS, CONN_BUCKETS};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn kv(k: &str, v: impl Into<AttrValue>) -> KeyValue {
    let value = match v.into() {
        AttrValue::S(s) => any_value::Value::StringValue(s),
        AttrValue::I(i) => any_value::Value::IntValue(i),
    };
    KeyValue { key: k.to_string(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

pub enum AttrValue {
    S(String),
    I(i64),
}
impl From<&str> for AttrValue {
    fn from(s: &str) -> Self {
        AttrValue::S(s.to_string())
    }
}
impl From<String> for AttrValue {
    fn from(s: String) -> Self {
        AttrValue::S(s)
    }
}
impl From<u16> for AttrValue {
    fn from(i: u16) -> Self {
        AttrValue::I(i as i64)
    }
}

pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

struct Builder {
    start: u64,
    now: u64,
    metrics: Vec<Metric>,
}

impl Builder {
    fn points(&self, points: Vec<(Vec<KeyValue>, number_data_point::Value)>) -> Vec<NumberDataPoint> {
        points
            .into_iter()
            .map(|(attributes, value)| NumberDataPoint {
                attributes,
                start_time_unix_nano: self.start,
                time_unix_nano: self.now,
                value: Some(value),
                ..Default::default()
            })
            .collect()
    }

    fn push(&mut self, name: &str, unit: &str, desc: &str, data: metric::Data) {
        self.metrics.push(Metric { name: name.into(), description: desc.into(), unit: unit.into(), data: Some(data), ..Default::default() });
    }

    /// A cumulative sum of integers (monotonic: a counter; else an up-down counter).
    fn sum(&mut self, name: &str, unit: &str, desc: &str, monotonic: bool, points: Vec<(Vec<KeyValue>, u64)>) {
        let data_points = self.points(points.into_iter().map(|(a, v)| (a, number_data_point::Value::AsInt(v as i64))).collect());
        let data = metric::Data::Sum(Sum { data_points, aggregation_temporality: AggregationTemporality::Cumulative as i32, is_monotonic: monotonic });
        self.push(name, unit, desc, data);
    }

    /// A monotonic cumulative sum of reals (e.g. seconds of CPU time).
    fn sum_f64(&mut self, name: &str, unit: &str, desc: &str, points: Vec<(Vec<KeyValue>, f64)>) {
        let data_points = self.points(points.into_iter().map(|(a, v)| (a, number_data_point::Value::AsDouble(v))).collect());
        let data = metric::Data::Sum(Sum { data_points, aggregation_temporality: AggregationTemporality::Cumulative as i32, is_monotonic: true });
        self.push(name, unit, desc, data);
    }

    fn gauge(&mut self, name: &str, unit: &str, desc: &str, points: Vec<(Vec<KeyValue>, f64)>) {
        let data_points = self.points(points.into_iter().map(|(a, v)| (a, number_data_point::Value::AsDouble(v))).collect());
        self.push(name, unit, desc, metric::Data::Gauge(Gauge { data_points }));
    }

    /// A cumulative histogram in seconds.
    fn histogram(&mut self, name: &str, desc: &str, data_points: Vec<HistogramDataPoint>) {
        self.metrics.push(Metric {
            name: name.into(),
            description: desc.into(),
            unit: "s".into(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points,
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            })),
            ..Default::default()
        });
    }
}

/// The whole cumulative state as one OTLP request.
pub fn build_request(stats: &Stats, drops: &crate::loader::Drops, host: &str, start: u64, now: u64) -> ExportMetricsServiceRequest {
    let mut b = Builder { start, now, metrics: Vec::new() };
    let sys = || kv("db.system.name", "mysql");
    let port_attrs = |p: u16| vec![sys(), kv("server.port", p)];
    b.sum("breakwater.agent.connections.opened", "{connection}", "Connections accepted on a watched MySQL port.", true,
        stats.ports.iter().map(|(p, s)| (port_attrs(*p), s.opened)).collect());
    b.sum("breakwater.agent.connections.closed", "{connection}", "Connections closed on a watched MySQL port.", true,
        stats.ports.iter().map(|(p, s)| (port_attrs(*p), s.closed)).collect());
    b.sum("breakwater.agent.connections.active", "{connection}", "Connections open now (since the agent started).", false,
        stats.ports.keys().map(|p| (port_attrs(*p), stats.active(*p))).collect());
    b.sum("breakwater.agent.connection.rtt.count", "{connection}", "Closed connections with a known smoothed RTT.", true,
        stats.ports.iter().map(|(p, s)| (port_attrs(*p), s.rtt_count)).collect());
    b.sum("breakwater.agent.connection.rtt.sum", "us", "Sum of the smoothed RTT of closed connections, in microseconds.", true,
        stats.ports.iter().map(|(p, s)| (port_attrs(*p), (s.rtt_seconds_sum * 1e6) as u64)).collect());
    b.sum("breakwater.agent.tcp.retransmits", "{segment}", "Retransmitted TCP segments on watched connections.", true,
        stats.ports.iter().map(|(p, s)| (port_attrs(*p), s.retransmits)).collect());
    b.sum("breakwater.agent.requests.in_flight", "{request}", "Requests being served now: arrived, not yet answered.", false,
        stats.ports.iter().map(|(p, s)| (port_attrs(*p), s.in_flight)).collect());
    b.sum("breakwater.agent.connections.encrypted", "{connection}", "Open connections that negotiated TLS (their requests cannot be seen).", false,
        stats.ports.iter().map(|(p, s)| (port_attrs(*p), s.encrypted)).collect());
    load_metrics(&mut b, stats, &port_attrs);
    let mut io = Vec::new();
    for (p, s) in &stats.ports {
        let mut rx = port_attrs(*p);
        rx.push(kv("network.io.direction", "receive"));
        io.push((rx, s.bytes_in));
        let mut tx = port_attrs(*p);
        tx.push(kv("network.io.direction", "transmit"));
        io.push((tx, s.bytes_out));
    }
    b.sum("breakwater.agent.network.io", "By", "Bytes on closed connections.", true, io);
    let peer_attrs = |p: u16, ip: &std::net::IpAddr| vec![sys(), kv("server.port", p), kv("client.address", ip.to_string())];
    b.sum("breakwater.agent.client.connections.opened", "{connection}", "Connections accepted, per client address.", true,
        stats.peers.iter().map(|((p, ip), s)| (peer_attrs(*p, ip), s.opened)).collect());
    b.sum("breakwater.agent.client.connections.closed", "{connection}", "Connections closed, per client address.", true,
        stats.peers.iter().map(|((p, ip), s)| (peer_attrs(*p, ip), s.closed)).collect());
    b.sum("breakwater.agent.client.requests", "{request}", "Requests answered, per client address.", true,
        stats.peers.iter().map(|((p, ip), s)| (peer_attrs(*p, ip), s.requests)).collect());
    b.sum("breakwater.agent.client.request.errors", "{request}", "Requests answered with an ERR packet, per client address.", true,
        stats.peers.iter().map(|((p, ip), s)| (peer_attrs(*p, ip), s.errors)).collect());
    let op_attrs = |p: u16, op: &str| vec![sys(), kv("server.port", p), kv("db.operation.name", op)];
    b.sum("breakwater.agent.request.errors", "{request}", "Requests answered with a MySQL ERR packet.", true,
        stats.ops.iter().map(|((p, op), s)| (op_attrs(*p, op), s.errors)).collect());
    b.sum("breakwater.agent.dropped_events", "{event}", "Events lost because a fixed-size kernel map was full.", true,
        breakwater_agent_common::DROP_REASONS.iter().zip(drops).map(|(r, n)| (vec![kv("reason", *r)], *n)).collect());
    // Histograms with explicit bounds (seconds); bucket i counts (bound[i-1], bound[i]].
    let conn_points = stats
        .ports
        .iter()
        .map(|(p, s)| HistogramDataPoint {
            attributes: port_attrs(*p),
            start_time_unix_nano: start,
            time_unix_nano: now,
            count: s.lifetimes,
            sum: Some(s.conn_seconds_sum),
            bucket_counts: s.conn_le.to_vec(),
            explicit_bounds: CONN_BUCKETS.to_vec(),
            ..Default::default()
        })
        .collect();
    b.histogram("breakwater.agent.connection.duration", "Lifetime of closed connections.", conn_points);
    let mut points = Vec::new();
    for ((p, op), s) in &stats.ops {
        let counts = s.le.to_vec();
        points.push(HistogramDataPoint {
            attributes: op_attrs(*p, op),
            start_time_unix_nano: start,
            time_unix_nano: now,
            count: s.count,
            sum: Some(s.sum_ns as f64 / 1e9),
            bucket_counts: counts,
            explicit_bounds: BUCKETS.to_vec(),
            min: Some(s.min_ns() as f64 / 1e9),
            max: Some(s.max_ns as f64 / 1e9),
            ..Default::default()
        });
    }
    b.histogram("breakwater.agent.request.duration", "From a request's arrival to its response's departure, per operation.", points);
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![kv("service.name", "breakwater-agent"), kv("host.name", host)],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "breakwater-agent".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                metrics: b.metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// The servers' cgroup load (see `load`).
fn load_metrics(b: &mut Builder, stats: &Stats, port_attrs: &dyn Fn(u16) -> Vec<KeyValue>) {
    use crate::load::{KINDS, RESOURCES};
    let attrs = |p: u16, l: &crate::load::CgroupLoad| {
        let mut a = port_attrs(p);
        a.push(kv("cgroup", l.cgroup.clone()));
        a
    };
    b.sum_f64("breakwater.agent.server.cpu.time", "s", "CPU time used by the server's cgroup.",
        stats.load.iter().map(|(p, l)| (attrs(*p, l), l.cpu_seconds)).collect());
    b.sum_f64("breakwater.agent.server.cpu.throttled_time", "s", "Time the server's cgroup was throttled by its CPU limit.",
        stats.load.iter().map(|(p, l)| (attrs(*p, l), l.throttled_seconds)).collect());
    b.gauge("breakwater.agent.server.memory.usage", "By", "Memory charged to the server's cgroup.",
        stats.load.iter().filter_map(|(p, l)| l.memory_bytes.map(|m| (attrs(*p, l), m as f64))).collect());
    b.gauge("breakwater.agent.server.memory.limit", "By", "The memory limit of the server's cgroup (only where it has one).",
        stats.load.iter().filter_map(|(p, l)| l.memory_limit_bytes.map(|m| (attrs(*p, l), m as f64))).collect());
    b.gauge("breakwater.agent.server.cpu.limit", "{cpu}", "The CPU limit of the server's cgroup in cores (only where it has one).",
        stats.load.iter().filter_map(|(p, l)| l.cpu_limit_cores.map(|c| (attrs(*p, l), c))).collect());
    let mut ratio = Vec::new();
    let mut stalled = Vec::new();
    for (p, l) in &stats.load {
        for (i, r) in RESOURCES.iter().enumerate() {
            for (j, k) in KINDS.iter().enumerate() {
                if let Some(x) = l.pressure[i][j] {
                    let mut a = attrs(*p, l);
                    a.push(kv("pressure.resource", *r));
                    a.push(kv("pressure.kind", *k));
                    ratio.push((a.clone(), x.avg10));
                    stalled.push((a, x.total_seconds));
                }
            }
        }
    }
    b.gauge("breakwater.agent.server.pressure", "1", "Share of the last 10 s in which the server's tasks stalled on a resource (PSI avg10).", ratio);
    b.sum_f64("breakwater.agent.server.pressure.stall_time", "s", "Time the server's tasks stalled on a resource (PSI total).", stalled);
}

/// One export target.
#[derive(Clone, Debug)]
pub enum Target {
    Grpc(String),
    Http(String),
}

/// Send over OTLP/gRPC.
pub async fn send_grpc(endpoint: &str, req: ExportMetricsServiceRequest, token: Option<&str>) -> Result<(), String> {
    let mut req = tonic::Request::new(req);
    if let Some(t) = token {
        let v = format!("Bearer {t}").parse().map_err(|_| "the OTLP token is not a valid header value".to_string())?;
        req.metadata_mut().insert("authorization", v);
    }
    let exchange = async {
        let mut client = MetricsServiceClient::connect(endpoint.to_string()).await.map_err(|e| e.to_string())?;
        client.export(req).await.map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.map_err(|_| "timed out".to_string())?
}

/// Send over OTLP/HTTP with a protobuf body (plain http:// only).
pub async fn send_http(url: &str, req: ExportMetricsServiceRequest, token: Option<&str>) -> Result<(), String> {
    breakwater_otlp_http::post_protobuf_auth(url, "/v1/metrics", &req.encode_to_vec(), Duration::from_secs(10), token).await
}
