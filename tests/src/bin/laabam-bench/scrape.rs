//! Reading our processes' Prometheus metrics during and after a run.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub(crate) async fn scrape(port: u16) -> String {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let Ok(response) = client
        .get(format!("http://127.0.0.1:{port}/metrics").parse().unwrap())
        .await
    else {
        return String::new();
    };
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    String::from_utf8_lossy(&body).into_owned()
}

pub(crate) async fn counter(port: u16, name: &str) -> f64 {
    scrape(port)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The upper bound of the histogram bucket holding quantile `q` (as Prometheus would bound it).
pub(crate) fn histogram_quantile(metrics: &str, name: &str, q: f64) -> String {
    let buckets: Vec<(String, f64)> = metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix("_bucket{le=\"")?;
            let (le, count) = rest.split_once("\"} ")?;
            Some((le.to_owned(), count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map_or("?".into(), |(le, _)| le.clone())
}

/// A process's own counts of what it did (attempts by outcome, deferrals, retries, items per
/// Redis call), so a run shows work beyond one attempt per delivery and how well calls fill.
pub(crate) async fn print_counters(port: u16, wanted: &[&str]) {
    for line in scrape(port).await.lines() {
        if !line.starts_with('#') && wanted.iter().any(|w| line.contains(w)) && !line.ends_with(" 0") {
            println!("  {line}");
        }
    }
}
