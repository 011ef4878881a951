//! Listening sockets: bound before anything serves on them, so that a port in use is an
//! error naming the listener.

use std::net::SocketAddr;

use crate::config::{self, Config};

/// A listen address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("{what} {name:?}: cannot listen on {addr}: {source}")]
pub struct BindError {
    /// `"listener"` or `"admin"`.
    pub what: &'static str,
    pub name: String,
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Sockets bound for a config, before anything serves on them.
#[derive(Debug)]
pub struct Bound {
    /// (listener name, socket), in config order.
    pub listeners: Vec<(String, std::net::TcpListener)>,
    pub admin: Option<std::net::TcpListener>,
}

/// Binds every listener and the admin endpoint of `config`. The first failure is
/// returned naming the listener and the address; nothing stays bound then.
pub fn bind(config: &Config) -> Result<Bound, BindError> {
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        listeners.push((l.name.clone(), bind_listener(l)?));
    }
    let admin = match &config.admin {
        Some(admin) => Some(bind_one(admin.bind).map_err(|source| BindError {
            what: "admin",
            name: "admin".into(),
            addr: admin.bind,
            source,
        })?),
        None => None,
    };
    Ok(Bound { listeners, admin })
}

/// Binds one listener's address; the error names the listener.
pub(crate) fn bind_listener(
    l: &config::ListenerConfig,
) -> Result<std::net::TcpListener, BindError> {
    bind_one(l.bind).map_err(|source| BindError {
        what: "listener",
        name: l.name.clone(),
        addr: l.bind,
        source,
    })
}

/// A non-blocking listening socket with `SO_REUSEADDR` (so a restart does not wait for
/// TIME_WAIT), a deep accept backlog, and the options every client socket should have.
pub(crate) fn bind_one(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit these (Linux copies them from the listener), which saves
    // five setsockopt() calls per client connection.
    socket.set_nodelay(true)?;
    socket.set_tcp_keepalive(&crate::proxy::KEEPALIVE)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}
