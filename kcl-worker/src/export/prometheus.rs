//! A Prometheus scrape endpoint: the recorder of `metrics-exporter-prometheus`, rendered in
//! the text exposition format at `GET /metrics` by [`super::http`].
//!
//! Prometheus names cannot hold dots: `KinesisDataFetcher.getRecords.Time` is exposed as
//! `KinesisDataFetcher_getRecords_Time`. Dimensions are labels (`Operation`, `ShardId`,
//! `WorkerIdentifier`); `.Time` and `.Success` histograms are summaries (`_sum`, `_count`,
//! quantiles).

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use super::ExportError;
use super::http::{HttpServer, Response, serve};

/// How often the recorder's summaries are maintained (expired quantile windows dropped).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// A running scrape endpoint. Dropping it stops it.
#[derive(Debug)]
pub struct PrometheusEndpoint {
    server: HttpServer,
    recorder: Option<PrometheusRecorder>,
    handle: PrometheusHandle,
    upkeep: tokio::task::JoinHandle<()>,
}

impl PrometheusEndpoint {
    /// Listens on `addr` (`GET /metrics`; any other path is 404). Needs a tokio runtime.
    pub async fn bind(addr: SocketAddr) -> Result<Self, ExportError> {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let served = handle.clone();
        let server = serve(addr, move |path| match path {
            "/metrics" => Response::ok("text/plain; version=0.0.4", served.render()),
            _ => Response::text(404, "not found; metrics are at /metrics\n"),
        })
        .await?;
        let upkept = handle.clone();
        let upkeep = tokio::spawn(async move {
            loop {
                tokio::time::sleep(UPKEEP_INTERVAL).await;
                upkept.run_upkeep();
            }
        });
        Ok(Self {
            server,
            recorder: Some(recorder),
            handle,
            upkeep,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The recorder to install (see [`super::install`]); `None` after the first call.
    pub fn take_recorder(&mut self) -> Option<PrometheusRecorder> {
        self.recorder.take()
    }

    /// The text the endpoint serves now.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

impl Drop for PrometheusEndpoint {
    fn drop(&mut self) {
        self.upkeep.abort();
    }
}
