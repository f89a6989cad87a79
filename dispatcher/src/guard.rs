//! Refuses non-public targets at connect time, unless the operator allows them. Checking the
//! addresses actually dialled (not the URL at registration only) defeats DNS rebinding.

use hyper_util::client::legacy::connect::dns::Name;
use laabam_shared::targets::TargetPolicy;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// A resolver that drops addresses the policy refuses, failing when none remain.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    pub policy: Arc<TargetPolicy>,
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = resolved.iter().copied().filter(|a| policy.permits(a.ip())).collect();
            match (allowed.is_empty(), resolved.first()) {
                (true, Some(refused)) => Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("refused: {}", TargetPolicy::refusal(name.as_str(), refused.ip())),
                )),
                _ => Ok(allowed.into_iter()),
            }
        })
    }
}

/// Checks the scheme, and a host that is an IP literal (those never reach the resolver).
pub fn check_url(url: &str, policy: &TargetPolicy) -> Result<(), String> {
    policy.check_scheme(url).map_err(|e| format!("refused: {e}"))?;
    let Ok(uri) = url.parse::<http::Uri>() else {
        return Ok(());
    };
    let host = uri.host().unwrap_or("").trim_start_matches('[').trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(ip) if !policy.permits(ip) => Err(format!("refused: {}", TargetPolicy::refusal(host, ip))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_private_hosts_are_refused_unless_allowed() {
        let strict = TargetPolicy::default();
        let open = TargetPolicy {
            allow_private: true,
            ..Default::default()
        };
        assert!(check_url("http://127.0.0.1:8080/x", &strict).is_err());
        assert!(check_url("http://[::1]/x", &strict).is_err());
        assert!(check_url("http://[::ffff:169.254.169.254]/", &strict).is_err());
        assert!(check_url("http://127.0.0.1:8080/x", &open).is_ok());
        assert!(check_url("https://8.8.8.8/", &strict).is_ok());
        assert!(
            check_url("https://example.com/", &strict).is_ok(),
            "names are checked when resolved"
        );
        let https_only = TargetPolicy {
            require_https: true,
            ..open
        };
        assert!(check_url("http://8.8.8.8/", &https_only).is_err());
    }
}
