//! Where a Vitally auth header may be sent (issue 15: no SSRF).
//!
//! Connect fetches whatever `api_url` an admin supplies, and every consumer call later
//! uses the stored URL, so both pass one [`AllowList`]: `https` to Vitally's own hosts
//! by default, more only where `VITALLY_ALLOWED_HOSTS` names them. Hosts are compared in
//! the form the URL parser normalises them to (`127.1`, `0x7f000001`, `2130706433`,
//! octal, percent-encoding, IDNA, upper case and a trailing dot each become one
//! spelling), and a name must resolve to public addresses ([`AllowList::admit`], which
//! the HTTP client's resolver runs for every new connection, so a DNS answer that
//! changes later is checked too). Pure decisions; the client does the I/O.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use url::{Host, Url};

/// Vitally's API hosts, reached over `https` on 443: the allow-list without
/// `VITALLY_ALLOWED_HOSTS`.
pub const VITALLY_HOSTS: &[&str] = &["*.rest.vitally.io", "rest.vitally-eu.io", "rest.vitally.io"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Https,
    Http,
}

impl Scheme {
    fn of(url: &Url) -> Result<Scheme, Refusal> {
        match url.scheme() {
            "https" => Ok(Scheme::Https),
            "http" => Ok(Scheme::Http),
            other => Err(Refusal::Scheme(other.to_owned())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    /// One host: a domain (lower case, no trailing dot) or an address.
    Exact(Host<String>),
    /// Any name under a domain: `*.rest.vitally.io` keeps `.rest.vitally.io`.
    Under(String),
}

impl HostMatch {
    fn covers(&self, host: &Host<String>) -> bool {
        match (self, host) {
            (HostMatch::Exact(exact), _) => exact == host,
            (HostMatch::Under(suffix), Host::Domain(name)) => name.ends_with(suffix.as_str()),
            (HostMatch::Under(_), Host::Ipv4(_) | Host::Ipv6(_)) => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    scheme: Scheme,
    host: HostMatch,
    port: u16,
    /// Written with its scheme (`http://fake-vitally:8080`): the operator vouches for
    /// this origin, so its name may resolve to a private or loopback address.
    origin: bool,
}

impl Entry {
    /// `*.example.com`, `example.com[:port]` (https), or an origin `http[s]://host[:port]`.
    fn parse(raw: &str) -> Result<Entry, String> {
        let raw = raw.trim();
        // Messages show the entry as a URL is shown: never a password.
        let shown = crate::config::redact_url(raw);
        let origin = raw.contains("://");
        let (wildcard, rest) = match raw.strip_prefix("*.") {
            Some(rest) if !origin => (true, rest),
            Some(_) | None => (false, raw),
        };
        let text = if origin {
            rest.to_owned()
        } else {
            format!("https://{rest}")
        };
        let url = Url::parse(&text).map_err(|e| format!("{shown:?}: {e}"))?;
        let scheme = Scheme::of(&url).map_err(|e| format!("{shown:?}: {e}"))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!("{shown:?}: {}", Refusal::Credentials));
        }
        let plain = url.path() == "/"
            && url.query().is_none()
            && url.fragment().is_none()
            && !rest.contains('*');
        let host = normal_host(&url).filter(|_| plain).ok_or_else(|| {
            format!(
                "{shown:?}: expected a host (`rest.vitally.io`, `*.rest.vitally.io`, \
                 `host:port`) or an origin (`http://127.0.0.1:8089`), nothing else"
            )
        })?;
        let host = match (wildcard, host) {
            (false, host) => HostMatch::Exact(host),
            (true, Host::Domain(name)) if name.contains('.') => {
                HostMatch::Under(format!(".{name}"))
            }
            (true, _) => {
                return Err(format!(
                    "{shown:?}: a wildcard needs a domain of at least two labels after `*.`"
                ));
            }
        };
        Ok(Entry {
            scheme,
            host,
            port: url.port_or_known_default().unwrap_or(443),
            origin,
        })
    }

    fn matches(&self, scheme: Scheme, host: &Host<String>, port: u16) -> bool {
        self.scheme == scheme && self.port == port && self.host.covers(host)
    }
}

/// The hosts and origins a Vitally call may go to. Cheap to clone.
#[derive(Clone, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<Entry>,
    /// As configured, for `Debug` and messages (never holds a credential: entries
    /// with userinfo are refused).
    text: Vec<String>,
}

impl fmt::Debug for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.text).finish()
    }
}

impl Default for AllowList {
    fn default() -> Self {
        Self::vitally()
    }
}

impl AllowList {
    /// Vitally's own hosts, `https` only.
    pub fn vitally() -> AllowList {
        let mut list = AllowList {
            entries: Vec::new(),
            text: Vec::new(),
        };
        for host in VITALLY_HOSTS {
            list = list.with(host).expect("the built-in Vitally hosts parse");
        }
        list
    }

    /// Vitally's hosts plus the comma-separated entries of `VITALLY_ALLOWED_HOSTS`.
    pub fn vitally_and(extra: &str) -> Result<AllowList, String> {
        let mut list = AllowList::vitally();
        let entries: Vec<&str> = extra
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        if entries.is_empty() {
            return Err("lists no host; leave it unset for Vitally's hosts only".to_owned());
        }
        for entry in entries {
            list = list.with(entry)?;
        }
        Ok(list)
    }

    /// This list and one more entry (a host, `*.domain`, or an origin such as a local
    /// fake's `http://127.0.0.1:8089`).
    pub fn with(mut self, entry: &str) -> Result<AllowList, String> {
        self.entries.push(Entry::parse(entry)?);
        self.text.push(entry.trim().to_owned());
        Ok(self)
    }

    /// Whether a call to `url` may be made at all: scheme, no credentials, and a host
    /// and port the list names. Says why not in words an admin can act on.
    pub fn check(&self, url: &Url) -> Result<(), Refusal> {
        let scheme = Scheme::of(url)?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refusal::Credentials);
        }
        let host = normal_host(url).ok_or(Refusal::NoHost)?;
        let port = url.port_or_known_default().unwrap_or(0);
        if self.entries.iter().any(|e| e.matches(scheme, &host, port)) {
            return Ok(());
        }
        Err(self.why_not(scheme, host, port))
    }

    fn why_not(&self, scheme: Scheme, host: Host<String>, port: u16) -> Refusal {
        let shown = bounded(&format!("{host}:{port}"));
        let listed_as = |scheme| {
            self.entries
                .iter()
                .any(|e| e.scheme == scheme && e.host.covers(&host))
        };
        if scheme == Scheme::Http && listed_as(Scheme::Https) && !listed_as(Scheme::Http) {
            return Refusal::PlainHttp;
        }
        match address(&host).and_then(classify) {
            Some(class) => Refusal::Address { host: shown, class },
            None => Refusal::Host { host: shown },
        }
    }

    /// The addresses `name` resolved to that a call may connect to: public ones, or for
    /// an origin the operator listed, private and loopback ones too — never link-local
    /// (cloud metadata), unspecified, multicast or reserved ones.
    pub fn admit(
        &self,
        name: &str,
        resolved: impl IntoIterator<Item = SocketAddr>,
    ) -> Result<Vec<SocketAddr>, Refusal> {
        let host = Host::Domain(name.trim_end_matches('.').to_ascii_lowercase());
        let matching: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| e.host.covers(&host))
            .collect();
        let shown = bounded(&host.to_string());
        if matching.is_empty() {
            return Err(Refusal::Host { host: shown });
        }
        let vouched = matching.iter().any(|e| e.origin);
        let mut refused = None;
        let mut admitted = Vec::new();
        for addr in resolved {
            match classify(addr.ip()) {
                None => admitted.push(addr),
                Some(class) if vouched && class.may_be_vouched_for() => admitted.push(addr),
                Some(class) => refused = Some((addr.ip(), class)),
            }
        }
        match (admitted.is_empty(), refused) {
            (false, _) => Ok(admitted),
            (true, Some((ip, class))) => Err(Refusal::Resolved {
                host: shown,
                ip,
                class,
            }),
            (true, None) => Err(Refusal::Unresolved { host: shown }),
        }
    }
}

/// The host as the URL parser normalised it, without the trailing dot of a
/// fully-qualified name.
fn normal_host(url: &Url) -> Option<Host<String>> {
    match url.host()? {
        Host::Domain(name) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            (!name.is_empty()).then_some(Host::Domain(name))
        }
        Host::Ipv4(ip) => Some(Host::Ipv4(ip)),
        Host::Ipv6(ip) => Some(Host::Ipv6(ip)),
    }
}

/// A host as a message repeats it: at most 100 characters.
fn bounded(host: &str) -> String {
    crate::clip(host, 100)
}

fn address(host: &Host<String>) -> Option<IpAddr> {
    match host {
        Host::Domain(_) => None,
        Host::Ipv4(ip) => Some(IpAddr::V4(*ip)),
        Host::Ipv6(ip) => Some(IpAddr::V6(*ip)),
    }
}

/// Why a Vitally call may not go where it was asked to. The texts name no credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the scheme must be https, not {0}")]
    Scheme(String),
    #[error("the URL must not contain credentials; put them in the auth header")]
    Credentials,
    #[error("the URL has no host")]
    NoHost,
    #[error(
        "plain http would send the auth header in clear text: use https (a local fake is \
         allowed only by listing its origin, e.g. http://127.0.0.1:8089, in \
         VITALLY_ALLOWED_HOSTS)"
    )]
    PlainHttp,
    #[error("{host} is {} address, not a Vitally API host", class.with_article())]
    Address { host: String, class: AddressClass },
    #[error(
        "{host} is not a Vitally API host (https on {}); VITALLY_ALLOWED_HOSTS adds others",
        VITALLY_HOSTS.join(", ")
    )]
    Host { host: String },
    #[error("{host} resolved to {ip}, {} address: refused", class.with_article())]
    Resolved {
        host: String,
        ip: IpAddr,
        class: AddressClass,
    },
    #[error("{host} resolved to no address")]
    Unresolved { host: String },
}

/// Addresses a Vitally call never connects to unless an operator listed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    Unspecified,
    Loopback,
    Private,
    /// 100.64.0.0/10, carrier-grade NAT (and Alibaba Cloud's metadata address).
    SharedCgnat,
    /// 169.254.0.0/16 and fe80::/10, where cloud metadata services answer.
    LinkLocal,
    Multicast,
    Documentation,
    Reserved,
    /// `::ffff:a.b.c.d`: an IPv4 address in IPv6 clothing.
    Ipv4Mapped,
}

impl AddressClass {
    fn with_article(self) -> &'static str {
        match self {
            AddressClass::Unspecified => "an unspecified",
            AddressClass::Loopback => "a loopback",
            AddressClass::Private => "a private",
            AddressClass::SharedCgnat => "a shared (carrier-grade NAT)",
            AddressClass::LinkLocal => "a link-local (cloud metadata)",
            AddressClass::Multicast => "a multicast",
            AddressClass::Documentation => "a documentation",
            AddressClass::Reserved => "a reserved",
            AddressClass::Ipv4Mapped => "an IPv4-mapped IPv6",
        }
    }

    /// What a listed origin's name may resolve to: a fake or proxy on this machine or
    /// the cluster's network, never a metadata service or a non-unicast address.
    fn may_be_vouched_for(self) -> bool {
        match self {
            AddressClass::Loopback | AddressClass::Private | AddressClass::SharedCgnat => true,
            AddressClass::Unspecified
            | AddressClass::LinkLocal
            | AddressClass::Multicast
            | AddressClass::Documentation
            | AddressClass::Reserved
            | AddressClass::Ipv4Mapped => false,
        }
    }
}

/// `None` for a public unicast address; else what it is.
pub fn classify(ip: IpAddr) -> Option<AddressClass> {
    match ip {
        IpAddr::V4(ip) => classify_v4(ip),
        IpAddr::V6(ip) => classify_v6(ip),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<AddressClass> {
    use AddressClass::*;
    let [a, b, c, _] = ip.octets();
    match (a, b, c) {
        (0, _, _) => Some(Unspecified),
        (10, _, _) | (172, 16..=31, _) | (192, 168, _) => Some(Private),
        (100, 64..=127, _) => Some(SharedCgnat),
        (127, _, _) => Some(Loopback),
        (169, 254, _) => Some(LinkLocal),
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => Some(Documentation),
        // IETF protocol assignments (Oracle Cloud's metadata is 192.0.0.192),
        // benchmarking, and 240/4 with the broadcast address.
        (192, 0, 0) | (198, 18..=19, _) | (240..=255, _, _) => Some(Reserved),
        (224..=239, _, _) => Some(Multicast),
        _ => None,
    }
}

fn classify_v6(ip: Ipv6Addr) -> Option<AddressClass> {
    use AddressClass::*;
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    if ip.is_unspecified() {
        return Some(Unspecified);
    }
    if ip.is_loopback() {
        return Some(Loopback);
    }
    if ip.to_ipv4_mapped().is_some() {
        return Some(Ipv4Mapped);
    }
    match s {
        // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) reach the IPv4 address inside.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => classify_v4(embedded(hi, lo)),
        [0x2002, hi, lo, ..] => classify_v4(embedded(hi, lo)),
        [0x2001, 0x0db8, ..] => Some(Documentation),
        [0x3fff, b, ..] if b < 0x1000 => Some(Documentation),
        [0x2001, b, ..] if b < 0x0200 => Some(Reserved), // Teredo, ORCHID, …
        [0xfc00..=0xfdff, ..] => Some(Private),          // unique local (AWS metadata too)
        [0xfe80..=0xfebf, ..] => Some(LinkLocal),
        [0xfec0..=0xfeff, ..] => Some(Private), // site-local, deprecated
        [0xff00..=0xffff, ..] => Some(Multicast),
        [0x2000..=0x3fff, ..] => None, // global unicast
        _ => Some(Reserved),           // IPv4-compatible, discard, and the rest outside 2000::/3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(raw: &str) -> Url {
        Url::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    fn check(list: &AllowList, raw: &str) -> Result<(), Refusal> {
        list.check(&url(raw))
    }

    #[test]
    fn vitallys_hosts_are_allowed_over_https_on_443_only() {
        let list = AllowList::vitally();
        for ok in [
            "https://acme.rest.vitally.io",
            "https://ACME.Rest.Vitally.IO./resources",
            "https://a.b.rest.vitally.io:443",
            "https://rest.vitally.io",
            "https://rest.vitally-eu.io",
            "https://acme\u{3002}rest\u{3002}vitally\u{3002}io",
        ] {
            assert_eq!(check(&list, ok), Ok(()), "{ok}");
        }
        assert_eq!(
            check(&list, "http://acme.rest.vitally.io"),
            Err(Refusal::PlainHttp)
        );
        for refused in [
            "https://acme.rest.vitally.io:8443",
            "https://evil-rest.vitally.io",
            "https://rest.vitally.io.evil.com",
            "https://acme.rest.vitally-eu.io",
            "https://vitally.io",
            "https://rest.vit\u{430}lly.io",
        ] {
            assert!(
                matches!(check(&list, refused), Err(Refusal::Host { .. })),
                "{refused}: {:?}",
                check(&list, refused)
            );
        }
    }

    #[test]
    fn odd_spellings_of_loopback_are_one_address_and_refused_as_such() {
        let list = AllowList::vitally();
        for form in [
            "https://127.0.0.1",
            "https://127.1",
            "https://0x7f000001",
            "https://2130706433",
            "https://0177.0.0.1",
            "https://%31%32%37.0.0.1",
            "https://127.0.0.1.",
            "https://[::1]",
        ] {
            assert!(
                matches!(
                    check(&list, form),
                    Err(Refusal::Address {
                        class: AddressClass::Loopback,
                        ..
                    })
                ),
                "{form}: {:?}",
                check(&list, form)
            );
        }
        let err = check(&list, "https://0x7f000001:6379").unwrap_err();
        assert_eq!(
            err.to_string(),
            "127.0.0.1:6379 is a loopback address, not a Vitally API host"
        );
        assert_eq!(
            check(&list, "https://[::ffff:127.0.0.1]").unwrap_err(),
            Refusal::Address {
                host: "[::ffff:7f00:1]:443".into(),
                class: AddressClass::Ipv4Mapped
            }
        );
        assert!(
            check(&list, "https://169.254.169.254")
                .unwrap_err()
                .to_string()
                .contains("link-local (cloud metadata)")
        );
    }

    #[test]
    fn credentials_and_other_schemes_are_refused_before_any_host_is_considered() {
        let list = AllowList::vitally();
        assert_eq!(
            check(&list, "https://acme.rest.vitally.io@127.0.0.1"),
            Err(Refusal::Credentials)
        );
        assert_eq!(
            check(&list, "https://k:pw@acme.rest.vitally.io"),
            Err(Refusal::Credentials)
        );
        assert_eq!(
            check(&list, "ftp://acme.rest.vitally.io"),
            Err(Refusal::Scheme("ftp".into()))
        );
    }

    #[test]
    fn an_origin_entry_allows_exactly_its_scheme_host_and_port() {
        let list =
            AllowList::vitally_and("http://127.0.0.1:8089, vitally.corp.example:8443").unwrap();
        assert_eq!(check(&list, "http://127.0.0.1:8089"), Ok(()));
        assert_eq!(check(&list, "http://127.1:8089/"), Ok(()));
        assert_eq!(check(&list, "https://vitally.corp.example:8443"), Ok(()));
        assert!(check(&list, "http://127.0.0.1:8090").is_err());
        assert!(check(&list, "https://127.0.0.1:8089").is_err());
        assert!(check(&list, "http://localhost:8089").is_err());
        assert_eq!(
            check(&list, "http://vitally.corp.example:8443"),
            Err(Refusal::PlainHttp)
        );
        assert_eq!(check(&list, "https://acme.rest.vitally.io"), Ok(()));
    }

    #[test]
    fn malformed_or_too_broad_entries_are_refused() {
        for bad in [
            "*",
            "*.io",
            "http://*.example.com",
            "https://u:p@host.example",
            "host.example/path",
            "ftp://host.example",
            "https://host.example/?q",
            "exa mple.com",
        ] {
            assert!(AllowList::vitally_and(bad).is_err(), "{bad}");
        }
        assert!(AllowList::vitally_and(" , ,").is_err());
        assert!(AllowList::vitally_and("*.corp.example,http://fake-vitally:8080").is_ok());
    }

    fn addrs(ips: &[&str]) -> Vec<SocketAddr> {
        ips.iter()
            .map(|ip| SocketAddr::new(ip.parse().unwrap(), 0))
            .collect()
    }

    #[test]
    fn a_name_must_resolve_to_public_addresses_unless_its_origin_is_listed() {
        let list = AllowList::vitally_and("http://fake-vitally:8080").unwrap();
        assert_eq!(
            list.admit("acme.rest.vitally.io", addrs(&["34.1.2.3"])),
            Ok(addrs(&["34.1.2.3"]))
        );
        // Rebinding: a private answer is dropped, a wholly private one refused.
        assert_eq!(
            list.admit("acme.rest.vitally.io", addrs(&["10.0.0.5", "34.1.2.3"])),
            Ok(addrs(&["34.1.2.3"]))
        );
        assert_eq!(
            list.admit("Acme.Rest.Vitally.IO.", addrs(&["169.254.169.254"])),
            Err(Refusal::Resolved {
                host: "acme.rest.vitally.io".into(),
                ip: "169.254.169.254".parse().unwrap(),
                class: AddressClass::LinkLocal
            })
        );
        assert_eq!(
            list.admit("fake-vitally", addrs(&["172.18.0.4"])),
            Ok(addrs(&["172.18.0.4"]))
        );
        assert!(
            list.admit("fake-vitally", addrs(&["169.254.169.254"]))
                .is_err()
        );
        assert!(
            list.admit("elsewhere.example", addrs(&["34.1.2.3"]))
                .is_err()
        );
        assert_eq!(
            list.admit("acme.rest.vitally.io", addrs(&[])),
            Err(Refusal::Unresolved {
                host: "acme.rest.vitally.io".into()
            })
        );
    }

    #[test]
    fn every_non_public_range_is_classified() {
        use AddressClass::*;
        let cases = [
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("100.64.0.1", SharedCgnat),
            ("100.100.100.200", SharedCgnat),
            ("127.0.0.1", Loopback),
            ("127.255.0.9", Loopback),
            ("169.254.169.254", LinkLocal),
            ("192.0.0.192", Reserved),
            ("192.0.2.1", Documentation),
            ("198.18.0.1", Reserved),
            ("224.0.0.1", Multicast),
            ("255.255.255.255", Reserved),
            ("::", Unspecified),
            ("::1", Loopback),
            ("::ffff:10.0.0.1", Ipv4Mapped),
            ("::ffff:8.8.8.8", Ipv4Mapped),
            ("::127.0.0.1", Reserved),
            ("64:ff9b::a00:1", Private),
            ("64:ff9b::a9fe:a9fe", LinkLocal),
            ("2002:7f00:1::", Loopback),
            ("2001::1", Reserved),
            ("2001:db8::1", Documentation),
            ("fc00::1", Private),
            ("fd00:ec2::254", Private),
            ("fe80::1", LinkLocal),
            ("ff02::1", Multicast),
            ("100::1", Reserved),
        ];
        for (ip, class) in cases {
            assert_eq!(classify(ip.parse().unwrap()), Some(class), "{ip}");
        }
        for public in [
            "8.8.8.8",
            "34.1.2.3",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1",
            "64:ff9b::808:808",
            "2002:808:808::",
        ] {
            assert_eq!(classify(public.parse().unwrap()), None, "{public}");
        }
    }
}
