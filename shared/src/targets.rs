//! Which addresses an endpoint may reach. Webhook URLs are chosen by account owners, so by
//! default nothing on the platform's own network is reachable through them (SSRF): loopback,
//! private, link-local (cloud metadata at 169.254.169.254 included), multicast and reserved
//! ranges, in IPv4, IPv6 and the IPv6 forms that embed an IPv4 address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address range, `10.0.0.0/8` or `fd00::/8` (a bare address is a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an address range like 10.0.0.0/8 or fd00::/8");
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let network: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { network, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Which endpoint targets are allowed: the operator's settings, applied at registration and
/// again at connect time.
#[derive(Debug, Clone, Default)]
pub struct TargetPolicy {
    /// Any address at all (tests and local demos).
    pub allow_private: bool,
    /// Non-public ranges allowed anyway (an internal network the operator trusts).
    pub allowed: Vec<Cidr>,
    /// Refuse plain `http://` endpoints.
    pub require_https: bool,
}

impl TargetPolicy {
    /// Whether an endpoint may be reached at `ip`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        self.allow_private || is_public(ip) || self.allowed.iter().any(|c| c.contains(ip))
    }

    /// Why a URL's scheme is refused, if it is.
    pub fn check_scheme(&self, url: &str) -> Result<(), String> {
        if self.require_https && !url.starts_with("https://") {
            return Err("plain http:// endpoints are refused here (LAABAM_REQUIRE_HTTPS=true): use https://".into());
        }
        Ok(())
    }

    /// Why an address is refused.
    pub fn refusal(host: &str, ip: IpAddr) -> String {
        format!(
            "{host} is not a public address ({ip}); private targets are not allowed (LAABAM_ALLOW_PRIVATE_TARGETS, LAABAM_ALLOWED_TARGETS)"
        )
    }
}

/// The target settings, as flags and variables (dispatcher and producer).
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// Allow endpoints on loopback, private and link-local addresses (tests and local demos).
    #[arg(long, env = "LAABAM_ALLOW_PRIVATE_TARGETS", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_private_targets: bool,
    /// Comma-separated address ranges allowed although not public, e.g. `10.20.0.0/16`.
    #[arg(long, env = "LAABAM_ALLOWED_TARGETS", value_delimiter = ',')]
    pub allowed_targets: Vec<Cidr>,
    /// Refuse plain http:// endpoints.
    #[arg(long, env = "LAABAM_REQUIRE_HTTPS", default_value_t = false, action = clap::ArgAction::Set)]
    pub require_https: bool,
}

impl TargetArgs {
    pub fn policy(&self) -> TargetPolicy {
        TargetPolicy {
            allow_private: self.allow_private_targets,
            allowed: self.allowed_targets.clone(),
            require_https: self.require_https,
        }
    }
}

/// `true` when `ip` is a public unicast address an endpoint may be delivered to.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || (a == 192 && b == 0 && c == 0)) // IETF protocol assignments
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = embedded_v4(ip) {
        return is_public_v4(v4);
    }
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local
        || (first & 0xffc0) == 0xfe80 // link-local
        || (first & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (first == 0x2001 && ip.segments()[1] == 0x0db8)) // documentation
}

/// The IPv4 address inside IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`)
/// and NAT64 (`64:ff9b::a.b.c.d`) addresses.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(tail()),
        [0, 0, 0, 0, 0, 0, hi, _] if hi != 0 => Some(tail()),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn public(s: &str) -> bool {
        is_public(s.parse().unwrap())
    }

    #[test]
    fn internal_addresses_are_refused_in_every_form() {
        for ip in [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "198.18.0.1",
            "192.0.0.170",
            "192.0.2.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd00:ec2::254",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(!public(ip), "{ip} must be refused");
        }
    }

    #[test]
    fn ranges_contain_their_addresses_in_both_families() {
        let net: Cidr = "10.20.0.0/16".parse().unwrap();
        assert!(net.contains("10.20.3.4".parse().unwrap()));
        assert!(net.contains("::ffff:10.20.3.4".parse().unwrap()));
        assert!(!net.contains("10.21.0.1".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        let host: Cidr = "127.0.0.1".parse().unwrap();
        assert!(host.contains("127.0.0.1".parse().unwrap()) && !host.contains("127.0.0.2".parse().unwrap()));
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_policy_allows_public_addresses_listed_ranges_or_everything() {
        let strict = TargetPolicy::default();
        assert!(strict.permits("8.8.8.8".parse().unwrap()));
        assert!(!strict.permits("10.20.0.5".parse().unwrap()));
        let listed = TargetPolicy {
            allowed: vec!["10.20.0.0/16".parse().unwrap()],
            ..Default::default()
        };
        assert!(listed.permits("10.20.0.5".parse().unwrap()));
        assert!(!listed.permits("10.30.0.5".parse().unwrap()));
        assert!(
            TargetPolicy {
                allow_private: true,
                ..Default::default()
            }
            .permits("127.0.0.1".parse().unwrap())
        );
        let https = TargetPolicy {
            require_https: true,
            ..Default::default()
        };
        assert!(https.check_scheme("http://example.com/").is_err());
        assert!(https.check_scheme("https://example.com/").is_ok());
    }

    #[test]
    fn public_addresses_are_allowed() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.216.34",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(public(ip), "{ip} must be allowed");
        }
    }
}
