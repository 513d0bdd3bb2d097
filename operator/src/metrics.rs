//! The operator's metrics (prometheus-client, prefix `cairn_`) and its
//! small HTTP endpoint: `/metrics`, `/healthz` (the process runs) and
//! `/readyz` (it has reached the API server).
//!
//! Metrics: reconciles and their failures by controller and reason, their
//! durations; per link the bytes copied of the copy in progress, its rate,
//! and the lag (the recovery point's age).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub controller: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkLabels {
    pub namespace: String,
    pub link: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 14))
}

/// Every metric, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ControllerLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub durations: Family<ControllerLabels, Histogram, fn() -> Histogram>,
    pub link_bytes: Family<LinkLabels, Gauge>,
    pub link_rate: Family<LinkLabels, Gauge>,
    pub link_lag: Family<LinkLabels, Gauge>,
    pub ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cairn");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let durations =
            Family::<ControllerLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                duration_histogram,
            );
        let (link_bytes, link_rate, link_lag) =
            (Family::default(), Family::default(), Family::default());
        registry.register("reconciles", "Reconciles run, by controller", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles failed, by controller and reason",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long reconciles took",
            durations.clone(),
        );
        registry.register(
            "link_copy_bytes",
            "Bytes copied of the copy in progress, per link",
            link_bytes.clone(),
        );
        registry.register(
            "link_copy_rate_bytes_per_second",
            "Rate of the copy in progress, per link",
            link_rate.clone(),
        );
        registry.register(
            "link_lag_seconds",
            "Age of the newest snapshot at the target (the recovery point), per link",
            link_lag.clone(),
        );
        Metrics {
            registry,
            reconciles,
            failures,
            durations,
            link_bytes,
            link_rate,
            link_lag,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Counts one reconcile of `controller` that started at `started`;
    /// `failure` is the reason it failed, if it did.
    pub fn observe(&self, controller: &str, started: Instant, failure: Option<&str>) {
        let l = ControllerLabels { controller: controller.into() };
        self.reconciles.get_or_create(&l).inc();
        self.durations.get_or_create(&l).observe(started.elapsed().as_secs_f64());
        if let Some(reason) = failure {
            let f = FailureLabels { controller: controller.into(), reason: reason.into() };
            self.failures.get_or_create(&f).inc();
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a string");
        out
    }
}

/// A short stable reason for an error: its variant's name.
pub fn reason(e: &impl std::fmt::Debug) -> String {
    let d = format!("{e:?}");
    d.split(|c: char| !c.is_alphanumeric()).next().unwrap_or("Unknown").to_string()
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the
/// process ends.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    let served = Arc::new(AtomicU64::new(0));
    loop {
        let Ok((mut conn, _)) = listener.accept().await else { continue };
        let (metrics, served) = (metrics.clone(), served.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n = conn.read(&mut buf).await.unwrap_or(0);
            let line = String::from_utf8_lossy(&buf[..n]);
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let (code, body) = match path {
                "/metrics" => ("200 OK", metrics.encode()),
                "/healthz" => ("200 OK", "ok\n".to_string()),
                "/readyz" if metrics.ready.load(Ordering::SeqCst) => ("200 OK", "ready\n".into()),
                "/readyz" => {
                    ("503 Service Unavailable", "the API server has not been reached yet\n".into())
                }
                _ => ("404 Not Found", "try /metrics, /healthz or /readyz\n".into()),
            };
            served.fetch_add(1, Ordering::Relaxed);
            let head = format!(
                "HTTP/1.1 {code}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn metrics_health_and_readiness_are_served() {
        let m = Arc::new(Metrics::default());
        m.observe("volume", Instant::now(), None);
        m.observe("volume", Instant::now(), Some("Agent"));
        let l = LinkLabels { namespace: "shop".into(), link: "db-to-b".into() };
        m.link_lag.get_or_create(&l).set(900);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, m.clone()));
        let get = |path: &'static str| async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            out
        };
        let metrics = get("/metrics").await;
        assert!(metrics.contains("cairn_reconciles_total{controller=\"volume\"} 2"), "{metrics}");
        assert!(
            metrics.contains(
                "cairn_reconcile_failures_total{controller=\"volume\",reason=\"Agent\"} 1"
            ),
            "{metrics}"
        );
        assert!(
            metrics.contains("cairn_link_lag_seconds{namespace=\"shop\",link=\"db-to-b\"} 900"),
            "{metrics}"
        );
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        m.ready.store(true, Ordering::SeqCst);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn reasons_are_variant_names() {
        #[derive(Debug)]
        enum E {
            Agent(#[allow(dead_code)] String),
        }
        assert_eq!(reason(&E::Agent("x".into())), "Agent");
    }
}
