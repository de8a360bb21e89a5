//! Reading the relay's Prometheus endpoint from tests, over a plain HTTP/1.0 request.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// The whole exposition text served on `/metrics`, or an empty string if it cannot be read.
pub fn scrape(addr: SocketAddr) -> String {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: relay\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

/// The value of one sample, named exactly as exposed, e.g.
/// `relay_connections_closed_total{service="shop",reason="closed"}`; 0 when absent.
pub fn sample(addr: SocketAddr, series: &str) -> f64 {
    scrape(addr)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `relay_connections_closed_total` of one service and reason.
pub fn closed(addr: SocketAddr, service: &str, reason: &str) -> f64 {
    sample(
        addr,
        &format!("relay_connections_closed_total{{service=\"{service}\",reason=\"{reason}\"}}"),
    )
}
