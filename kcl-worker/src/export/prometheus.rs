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
            "/metrics" => Response::ok(
                "text/plain; version=0.0.4",
                without_retired(&served.render()),
            ),
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
        without_retired(&self.handle.render())
    }
}

/// The exposition `text` without its retired samples: a gauge of a shard this worker no
/// longer reads is set to NaN (see `kcl_worker::metrics`), and is left out here, so the
/// series ends (Prometheus marks it stale) instead of repeating the shard's last lag
/// forever. A `# TYPE` or `# HELP` line is kept while a sample of its metric is.
fn without_retired(text: &str) -> String {
    fn sample_name(line: &str) -> &str {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        line.get(..end).unwrap_or(line)
    }
    fn is_retired(line: &str) -> bool {
        let after_labels = line
            .rfind('}')
            .map_or(line, |i| line.get(i + 1..).unwrap_or(""));
        let value = if line.contains('{') {
            after_labels.split_whitespace().next()
        } else {
            after_labels.split_whitespace().nth(1)
        };
        value == Some("NaN")
    }
    let samples: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter(|l| !is_retired(l))
        .collect();
    let kept = |metric: &str| {
        samples.iter().any(|s| {
            let name = sample_name(s);
            name == metric
                || name
                    .strip_prefix(metric)
                    .is_some_and(|rest| matches!(rest, "_sum" | "_count" | "_bucket"))
        })
    };
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let keep = if let Some(comment) = line
            .strip_prefix("# TYPE ")
            .or_else(|| line.strip_prefix("# HELP "))
        {
            kept(comment.split_whitespace().next().unwrap_or(""))
        } else if line.starts_with('#') || line.trim().is_empty() {
            true
        } else {
            !is_retired(line)
        };
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

impl Drop for PrometheusEndpoint {
    fn drop(&mut self) {
        self.upkeep.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::without_retired;

    #[test]
    fn retired_samples_and_their_type_lines_are_left_out() {
        let text = "# TYPE MillisBehindLatest gauge\n\
                    MillisBehindLatest{Operation=\"ProcessTask\",ShardId=\"a\"} NaN\n\
                    MillisBehindLatest{Operation=\"ProcessTask\",ShardId=\"b\"} 12\n\
                    \n\
                    # TYPE kcl_shard_consecutive_failures gauge\n\
                    kcl_shard_consecutive_failures{shard_id=\"a\"} NaN\n\
                    \n\
                    # TYPE plain gauge\n\
                    plain NaN\n\
                    # TYPE RecordsProcessed counter\n\
                    RecordsProcessed{Operation=\"ProcessTask\",ShardId=\"a\"} 40\n\
                    # TYPE Time summary\n\
                    Time_sum 3\n\
                    Time_count 1\n";
        let kept = without_retired(text);
        assert_eq!(
            kept,
            "# TYPE MillisBehindLatest gauge\n\
             MillisBehindLatest{Operation=\"ProcessTask\",ShardId=\"b\"} 12\n\
             \n\
             \n\
             # TYPE RecordsProcessed counter\n\
             RecordsProcessed{Operation=\"ProcessTask\",ShardId=\"a\"} 40\n\
             # TYPE Time summary\n\
             Time_sum 3\n\
             Time_count 1\n"
        );
    }
}
