//! Refuses non-public targets at connect time, unless the operator allows them. Checking the
//! addresses actually dialled (not the URL at registration only) defeats DNS rebinding.

use hyper_util::client::legacy::connect::dns::Name;
use laabam_shared::targets::is_public;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A resolver that drops non-public addresses, failing when none remain.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    pub allow_private: bool,
}

fn refusal(what: &str) -> String {
    format!("refused: {what} is not a public address (LAABAM_ALLOW_PRIVATE_TARGETS=true allows it)")
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            if allowed.is_empty() && !resolved.is_empty() {
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, refusal(name.as_str())));
            }
            Ok(allowed.into_iter())
        })
    }
}

/// Checks a URL whose host is an IP literal (those never reach the resolver).
pub fn check_literal(url: &str, allow_private: bool) -> Result<(), String> {
    if allow_private {
        return Ok(());
    }
    let Ok(uri) = url.parse::<http::Uri>() else {
        return Ok(());
    };
    let host = uri.host().unwrap_or("").trim_start_matches('[').trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(ip) if !is_public(ip) => Err(refusal(host)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_private_hosts_are_refused_unless_allowed() {
        assert!(check_literal("http://127.0.0.1:8080/x", false).is_err());
        assert!(check_literal("http://[::1]/x", false).is_err());
        assert!(check_literal("http://[::ffff:169.254.169.254]/", false).is_err());
        assert!(check_literal("http://127.0.0.1:8080/x", true).is_ok());
        assert!(check_literal("https://8.8.8.8/", false).is_ok());
        assert!(
            check_literal("https://example.com/", false).is_ok(),
            "names are checked when resolved"
        );
    }
}
