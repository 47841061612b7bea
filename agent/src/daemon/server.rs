//! The agent's process: the Unix socket the plugin talks to, the metrics port, the datastore watch that
//! keeps routes following claims and releases, and a clean stop on SIGTERM.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use poolwarden_protocol::{self as protocol, ErrorReply, Request, Response};
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
};
use tracing::{error, info, warn};

use super::{Agent, HostIndex, MAINTENANCE_INTERVAL};
use crate::store::keys;

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket or metrics port could not be set up.
    #[error("{what} {path}: {source}")]
    Listen {
        /// `socket` or `metrics address`.
        what: &'static str,
        /// Where.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The node could not register itself in the datastore.
    #[error("registering the node failed: {0}")]
    Register(String),
    /// Another agent answers on the socket.
    #[error("another agent is already serving {0}; stop it first")]
    AlreadyRunning(String),
}

/// Bind the socket, removing a stale one left by an agent that died; refuse if a live agent answers.
///
/// The socket is never reachable with a wider mode than 0600, whatever the umask: it is bound inside a
/// directory of its own created with mode 0700, given mode 0600 there, and only then renamed into place.
/// Directories made for it are created with mode 0700 (an existing directory is left as the operator made it).
async fn bind_socket(path: &Path) -> Result<UnixListener, ServeError> {
    use std::os::unix::fs::DirBuilderExt;
    let shown = path.display().to_string();
    let listen_err = |source| ServeError::Listen { what: "socket", path: shown.clone(), source };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(listen_err)?;
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ServeError::AlreadyRunning(shown));
        }
        std::fs::remove_file(path).map_err(listen_err)?;
    }
    let private = dir.join(format!(".poolwarden-bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private).map_err(listen_err)?;
    // The umask can only take bits away from 0700; make sure of the rest.
    let bound = (|| {
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
        let staged = private.join("agent.sock");
        let listener = UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound.map_err(listen_err)
}

async fn serve_connection(agent: Arc<Agent>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    // The request ends at a newline or when the client closes its side; an ADD's host interface index may
    // follow it on a line of its own (see `poolwarden_protocol`).
    let mut reader = BufReader::new(read.take(protocol::MAX_MESSAGE as u64 + 64));
    let mut body = Vec::new();
    // A client that connects and says nothing is dropped after a while, not served forever.
    let read = match tokio::time::timeout(protocol::REQUEST_READ_TIMEOUT, reader.read_until(b'\n', &mut body)).await {
        Ok(read) => read,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no request within {:?}", protocol::REQUEST_READ_TIMEOUT),
        )),
    };
    let response = match read {
        Err(e) => {
            Response::Error(ErrorReply { code: 5, msg: "reading the request failed".into(), details: e.to_string() })
        }
        Ok(_) => match protocol::decode_request(&body) {
            Ok(request) => {
                let follows = matches!(&request, Request::Add(add) if add.host_index_follows);
                let host_index = follows.then(|| read_host_index(reader));
                agent.handle_with(request, host_index).await
            }
            Err(refusal) => Response::Error(refusal),
        },
    };
    let encoded = serde_json::to_vec(&response).unwrap_or_default();
    if let Err(e) = write.write_all(&encoded).await {
        warn!(error = %e, "could not answer the plugin (it gave up?)");
    }
}

/// The host interface's index, on the line after an ADD's request. The line is read (and the connection
/// read to its end) by a task of its own, whether or not the ADD still wants it: a Unix socket closed with
/// data it has not read resets the connection, and the plugin would lose the answer to a failed ADD that it
/// sent its index after.
fn read_host_index(mut reader: impl AsyncBufRead + Unpin + Send + 'static) -> HostIndex {
    let (index, announced) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let drained = tokio::time::timeout(super::HOST_INTERFACE_WAIT, async move {
            let mut line = String::new();
            let read = match reader.read_line(&mut line).await {
                Ok(0) => Err("the plugin closed the connection without creating the host interface".into()),
                Ok(_) => line
                    .trim()
                    .parse()
                    .map_err(|e| format!("the plugin sent {line:?} as the host interface index: {e}")),
                Err(e) => Err(format!("reading the host interface index failed: {e}")),
            };
            let _ = index.send(read);
            let _ = tokio::io::copy_buf(&mut reader, &mut tokio::io::sink()).await;
        });
        let _ = drained.await;
    });
    Box::pin(async move {
        announced.await.unwrap_or_else(|_| {
            Err(format!("the plugin sent no host interface index within {:?}", super::HOST_INTERFACE_WAIT))
        })
    })
}

async fn serve_metrics(agent: Arc<Agent>, listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let agent = Arc::clone(&agent);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, body, content_type) = match path {
                "/metrics" => {
                    agent.refresh_pool_metrics().await;
                    ("200 OK", agent.metrics.render(), "application/openmetrics-text; version=1.0.0; charset=utf-8")
                }
                "/healthz" => ("200 OK", "ok\n".to_string(), "text/plain"),
                // Ready to serve ADDs: the datastore answers.
                "/readyz" => match agent.datastore_answers().await {
                    Ok(()) => ("200 OK", "ready\n".to_string(), "text/plain"),
                    Err(e) => {
                        ("503 Service Unavailable", format!("the datastore does not answer: {e}\n"), "text/plain")
                    }
                },
                _ => ("404 Not Found", "try /metrics, /healthz or /readyz\n".to_string(), "text/plain"),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
        });
    }
}

/// How long a reconcile waits after a datastore change for the changes that come with it.
const RECONCILE_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(20);

/// Run the agent until SIGTERM or SIGINT: register, reconcile, then serve.
pub async fn run(agent: Arc<Agent>, socket: PathBuf, metrics: SocketAddr) -> Result<(), ServeError> {
    match agent.register().await {
        Ok(record) => info!(addresses = ?record.addresses, "node registered"),
        Err(e) => return Err(ServeError::Register(e.to_string())),
    }
    // Checked again once registered: a migration that began between the check at start and the registration
    // did not see this agent (it marks first, then looks for registrations).
    if let Some(store) = agent.store()
        && let Ok(Some(from)) = crate::store::unfinished_migration(store.as_ref()).await
    {
        return Err(ServeError::Register(format!(
            "a migration into this datastore (from {from}) began as this agent started: its IPAM state is partial \
             until it finishes"
        )));
    }
    if let Ok(pools) = agent.pools().await {
        for notice in pools.iter().filter_map(crate::dataplane::encapsulation_not_applied) {
            warn!("{notice}");
        }
    }
    match agent.reconcile().await {
        Ok((added, removed)) => info!(added, removed, "routes reconciled with the datastore"),
        Err(e) => {
            error!(error = %e, "initial route reconcile failed; retrying in the background")
        }
    }
    let listener = bind_socket(&socket).await?;
    let metrics_listener = TcpListener::bind(metrics).await.map_err(|source| ServeError::Listen {
        what: "metrics address",
        path: metrics.to_string(),
        source,
    })?;
    info!(node = %agent.node().name, socket = %socket.display(), metrics = %metrics, "agent ready");

    agent.follow_membership();
    tokio::spawn(serve_metrics(Arc::clone(&agent), metrics_listener));
    let logger = Arc::clone(&agent);
    tokio::spawn(async move { logger.log_drops().await });
    // Also deletes what a previous run retired and did not get to.
    let reaper = Arc::clone(&agent);
    tokio::spawn(async move { reaper.reap_retired_links().await });
    // Blocks claimed or given back anywhere (by an agent or an operator's `ipam release`), nodes coming and
    // going, and addresses borrowed move the routes (and pools the NAT table): every change wakes one
    // reconcile, and changes arriving together share it. The first come through the mirror the reconcile
    // reads them from (woken after the mirror has them), pools through a watch of their own.
    let (changed, mut changes) = tokio::sync::mpsc::channel::<()>(1);
    let (follower, routing) = (Arc::clone(&agent), changed.clone());
    tokio::spawn(async move {
        loop {
            follower.routing_changed().await;
            let _ = routing.try_send(());
        }
    });
    let (watcher, pools_changed) = (Arc::clone(&agent), changed.clone());
    tokio::spawn(async move {
        // On the Kubernetes datastore, the pool resources' caches say when they change.
        if let Some(notify) = watcher.pool_changes() {
            loop {
                notify.notified().await;
                let _ = pools_changed.try_send(());
            }
        }
        let Some(store) = watcher.store() else { return };
        loop {
            let from = store.revision().await.unwrap_or(0) + 1;
            let Ok(mut watch) = store.watch(keys::POOLS, from).await else {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            };
            // Whatever changed before this watch started is caught by one reconcile now.
            let _ = pools_changed.try_send(());
            while let Some(event) = watch.next().await {
                if event.is_err() {
                    break;
                }
                let _ = pools_changed.try_send(());
            }
        }
    });
    let reconciler = Arc::clone(&agent);
    tokio::spawn(async move {
        while changes.recv().await.is_some() {
            tokio::time::sleep(RECONCILE_DEBOUNCE).await;
            while changes.try_recv().is_ok() {}
            if let Err(e) = reconciler.reconcile().await {
                warn!(error = %e, "route reconcile after a datastore change failed");
            }
        }
    });
    let collector = Arc::clone(&agent);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(collector.gc_interval());
        loop {
            tick.tick().await;
            if let Err(e) = collector.collect_garbage().await {
                warn!(error = %e, "garbage collection failed");
            }
        }
    });
    let maintainer = Arc::clone(&agent);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
        loop {
            tick.tick().await;
            if let Err(e) = maintainer.maintain().await {
                warn!(error = %e, "maintenance failed");
            }
        }
    });

    let mut terminate = signal(SignalKind::terminate()).map_err(|source| ServeError::Listen {
        what: "signal handler",
        path: "SIGTERM".into(),
        source,
    })?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|source| ServeError::Listen {
        what: "signal handler",
        path: "SIGINT".into(),
        source,
    })?;
    // Connections are accepted on a worker of the runtime, not on the thread that waits for the signals:
    // a connection then starts on the worker that saw it arrive, instead of waking a second thread (which
    // costs a few hundred microseconds on a virtual machine whose other CPU is idle).
    let acceptor = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(Arc::clone(&agent), stream));
                }
                Err(e) => warn!(error = %e, "accept failed"),
            }
        }
    });
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    acceptor.abort();
    info!("stopping: routes and endpoints stay in place for the next start");
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
