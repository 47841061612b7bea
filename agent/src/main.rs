//! The `poolwarden` command: define pools, inspect and repair IPAM, manage standalone namespaces, and run
//! the node agent. While an agent holds the embedded datastore, commands are forwarded to it over its socket.

use std::{process::ExitCode, sync::Arc};

use anyhow::{Result, bail};
use clap::Parser;
use poolwarden::{
    commands::{self, Cli, Command, DatastoreCommand, FirewallCommand, LogFormat},
    daemon::install,
    ipam::NodeInfo,
    store::{self, StoreError},
};
use poolwarden_protocol::{CliRequest, Request, Response};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The arguments as given, with `-f` paths made absolute so the agent reads the same files.
fn forwarded_args() -> Vec<String> {
    let cwd = std::env::current_dir().unwrap_or_default();
    let absolute = |p: &str| if p == "-" { p.to_string() } else { cwd.join(p).display().to_string() };
    let mut out = Vec::new();
    let mut next_is_file = false;
    for arg in std::env::args().skip(1) {
        if next_is_file {
            out.push(absolute(&arg));
            next_is_file = false;
        } else if arg == "-f" || arg == "--filename" {
            out.push(arg);
            next_is_file = true;
        } else if let Some(path) = arg.strip_prefix("--filename=") {
            out.push(format!("--filename={}", absolute(path)));
        } else {
            out.push(arg);
        }
    }
    out
}

fn reads_stdin(cli: &Cli) -> bool {
    matches!(&cli.command, Command::Apply { files } if files.iter().any(|f| f == "-"))
}

async fn run(cli: Cli) -> Result<u8> {
    if let Command::Agent {
        node,
        socket,
        node_labels,
        node_address,
        leak_grace_period,
        registration_ttl,
        node_gone_after,
        metrics_addr,
        log_format,
        enforcement,
        count_passed_packets,
        bpf_dir,
        kubernetes,
        kube_sync_timeout,
    } = &cli.command
    {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
        let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
        match log_format {
            LogFormat::Json => builder.json().init(),
            LogFormat::Text => builder.init(),
        }
        let labels = commands::parse_pairs(node_labels, "node label").map_err(|e| anyhow::anyhow!(e))?;
        let node = NodeInfo { name: commands::node_name(node.clone()), labels };
        if node.name.is_empty() {
            bail!("no node name: give --node or set NODENAME");
        }
        let lifetimes = poolwarden::daemon::Lifetimes {
            leak_grace: leak_grace_period.0,
            registration_ttl: registration_ttl.0,
            node_gone_after: node_gone_after.0,
        };
        if cli.datastore == store::KUBERNETES_DATASTORE {
            // An agent of the DaemonSet on a node whose agent kept its state in the embedded default (the
            // DaemonSet's default before `kubernetes`): the running pods' addresses are in that file, not in
            // the API server, so starting here would hand them out again. Switching is a migration.
            let embedded = store::DEFAULT_DATASTORE.trim_start_matches("embedded:");
            if std::env::var_os("POD_NAMESPACE").is_some() && holds_blocks(&cli, embedded).await {
                bail!(
                    "--datastore kubernetes, but this node's agent kept its IPAM state (blocks) in {embedded} (the embedded \
                     datastore, deploy/'s default before kubernetes): its pods' addresses are there, not in the API \
                     server. Set POOLWARDEN_DATASTORE back to embedded:{embedded} in the poolwarden-config \
                     ConfigMap, or migrate (deploy/README.md, \"Upgrade\": every agent stopped, \
                     `poolwarden datastore migrate --from embedded:{embedded} --to kubernetes`, then move the file \
                     away) before starting agents on kubernetes"
                );
            }
            // Everything is in the API server: blocks as IPAMBlock resources, pools as IPPool resources
            // (judged by the holder of the pools' Lease), nodes as Node objects; namespaces and pods too.
            let client = poolwarden::k8s::connect(cli.kubeconfig.as_deref()).await?;
            let pools = Arc::new(poolwarden::k8s::pools::ResourcePools::start(client.clone()));
            let judge = poolwarden::k8s::pools::PoolSync::judge(client.clone());
            let namespace = poolwarden::k8s::pools::agents_namespace();
            tokio::spawn(judge.run(namespace, node.name.clone()));
            let (directory, addresses) =
                kube_directory(client.clone(), &node.name, node_address.clone(), kube_sync_timeout.0).await;
            // The Node object is this node's registration: under another name, the other agents would find
            // this node's blocks named by a node that does not exist, and take its addresses.
            if let Err(e) = poolwarden::directory::Directory::node(directory.as_ref(), &node).await {
                bail!(
                    "--datastore kubernetes: no Node object for --node {:?} ({e}): the node's name must be the one \
                     the API server knows it by (the DaemonSet passes spec.nodeName)",
                    node.name
                );
            }
            if !pools.wait_ready(kube_sync_timeout.0).await {
                tracing::warn!("the IPPool and IPAMConfig resources are not listed yet; ADDs wait for them");
            }
            let changes = pools.changes();
            let agent = poolwarden::daemon::Agent::on_kubernetes(
                node,
                client,
                pools,
                directory,
                *enforcement,
                bpf_dir,
                addresses,
                lifetimes,
            )?
            .with_pool_changes(changes)
            .counting_passed_packets(*count_passed_packets);
            poolwarden::daemon::server::run(Arc::new(agent), socket.clone(), *metrics_addr).await?;
            return Ok(0);
        }
        let store = open_for_agent(&cli).await?;
        if let Some(from) = store::unfinished_migration(store.as_ref()).await? {
            bail!(
                "a migration into this datastore (from {from}) did not finish, so its IPAM state is partial: run \
                 `poolwarden datastore migrate` again to completion before starting agents on it"
            );
        }
        // What agents of an older version wrote is converted to block objects first, once none of them runs.
        let mut watch = poolwarden::migrate::MarkWatch::default();
        loop {
            match poolwarden::migrate::convert_in_place(&store, &node.name, &mut watch).await {
                Ok(poolwarden::migrate::Conversion::NotNeeded) => break,
                Ok(poolwarden::migrate::Conversion::Converted { blocks, addresses }) => {
                    tracing::info!(blocks, addresses, "converted the older version's records to block objects");
                    break;
                }
                Ok(poolwarden::migrate::Conversion::Wait(why)) => {
                    tracing::warn!("not starting yet: {why}");
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                }
                Err(e) => bail!("converting the datastore to block objects: {e}"),
            }
        }
        let mut addresses = node_address.clone();
        if !*kubernetes
            && poolwarden::directory::source_of(store.as_ref()).await? == poolwarden::directory::Source::Kubernetes
        {
            bail!(
                "this datastore serves a Kubernetes cluster (an agent ran on it with --kubernetes): namespaces and \
                 pods come from the API server, so start the agent with --kubernetes (and --kubeconfig outside a pod)"
            );
        }
        if cli.pool_source == commands::PoolSource::Kubernetes && !*kubernetes {
            bail!(
                "--pool-source kubernetes (POOLWARDEN_POOL_SOURCE) reads IPPool resources from the API server: \
                 start the agent with --kubernetes too"
            );
        }
        let kube = if *kubernetes {
            let client = poolwarden::k8s::connect(cli.kubeconfig.as_deref()).await?;
            if cli.pool_source == commands::PoolSource::Kubernetes {
                let sync = poolwarden::k8s::pools::PoolSync::start(client.clone(), Arc::clone(&store));
                let namespace = poolwarden::k8s::pools::agents_namespace();
                tokio::spawn(sync.run(namespace, node.name.clone()));
            }
            let (directory, found) = kube_directory(client, &node.name, addresses, kube_sync_timeout.0).await;
            addresses = found;
            poolwarden::directory::record_source(store.as_ref(), poolwarden::directory::Source::Kubernetes).await?;
            Some(directory)
        } else {
            None
        };
        let mut agent = poolwarden::daemon::Agent::new(node, store, *enforcement, bpf_dir, addresses, lifetimes)?
            .counting_passed_packets(*count_passed_packets);
        if let Some(directory) = kube {
            agent = agent.with_directory(directory);
        }
        let agent = Arc::new(agent);
        poolwarden::daemon::server::run(agent, socket.clone(), *metrics_addr).await?;
        return Ok(0);
    }
    match &cli.command {
        Command::InstallCni { plugin, cni_bin_dir, conflist, cni_conf_dir } => {
            let (plugin, conf) = install::install_cni(plugin, cni_bin_dir, conflist, cni_conf_dir)?;
            println!("installed {} and {}", plugin.display(), conf.display());
            return Ok(0);
        }
        Command::Uninstall { cni_bin_dir, cni_conf_dir, bpf_dir } => {
            let removed = install::uninstall(cni_bin_dir, cni_conf_dir, bpf_dir).await?;
            for file in &removed.files {
                println!("removed {}", file.display());
            }
            println!(
                "removed {} route(s) with protocol {}",
                removed.routes,
                poolwarden::dataplane::routes::ROUTE_PROTOCOL
            );
            if removed.pins {
                println!("removed the pinned enforcement in {}", bpf_dir.display());
            }
            return Ok(0);
        }
        _ => {}
    }
    if let Command::Datastore { command: DatastoreCommand::Migrate { from, to } } = &cli.command {
        return migrate(&cli, from.as_deref().unwrap_or(&cli.datastore), to).await;
    }
    if let Command::Firewall { command: FirewallCommand::Export { watch: true, .. } } = &cli.command {
        return watch_export(cli).await;
    }
    let stdin = if reads_stdin(&cli) { Some(std::io::read_to_string(std::io::stdin().lock())?) } else { None };
    if cli.datastore == store::KUBERNETES_DATASTORE {
        let held = commands::Held::kubernetes(poolwarden::k8s::connect(cli.kubeconfig.as_deref()).await?);
        let mut out = String::new();
        let result = commands::execute(cli, held, None, stdin, &mut out).await;
        print!("{out}");
        return result.map_err(|e| anyhow::anyhow!(e));
    }
    let opened = if cli.command.read_only() {
        store::open_existing(&cli.datastore, &cli.etcd_options()).await
    } else {
        store::open(&cli.datastore, &cli.etcd_options()).await
    };
    match opened {
        Ok(store) => {
            let mut out = String::new();
            let result = commands::execute(cli, commands::Held::key_value(store), None, stdin, &mut out).await;
            print!("{out}");
            result.map_err(|e| anyhow::anyhow!(e))
        }
        Err(locked @ StoreError::Locked { .. }) => {
            let (stdout, stderr, exit) = forward(&cli, stdin, &locked).await?;
            print!("{stdout}");
            eprint!("{stderr}");
            Ok(exit)
        }
        Err(other) => Err(other.into()),
    }
}

/// The Kubernetes directory for `node` (namespaces, its pods, itself), its caches awaited up to `limit`; and
/// the node's addresses: `given`, or else its Node object's.
async fn kube_directory(
    client: kube::Client,
    node: &str,
    given: Vec<std::net::IpAddr>,
    limit: std::time::Duration,
) -> (Arc<poolwarden::k8s::KubeDirectory>, Vec<std::net::IpAddr>) {
    let directory = poolwarden::k8s::KubeDirectory::start(client, node);
    if !directory.wait_ready(limit).await {
        tracing::warn!(
            "the Kubernetes caches are not in sync after {limit:?}; serving anyway, with direct lookups until they are"
        );
    }
    let mut addresses = given;
    if addresses.is_empty() {
        match directory.node_addresses().await {
            Ok(found) => addresses = found,
            Err(e) => tracing::warn!(error = %e, "no node addresses from the API server; detecting them"),
        }
    }
    (Arc::new(directory), addresses)
}

/// `datastore migrate`: to Kubernetes from a datastore, or from Kubernetes into one.
async fn migrate(cli: &Cli, from: &str, to: &str) -> Result<u8> {
    let open = |spec: &str, existing: bool| {
        let etcd = cli.etcd_options();
        let spec = spec.to_string();
        async move {
            let opened =
                if existing { store::open_existing(&spec, &etcd).await } else { store::open(&spec, &etcd).await };
            match opened {
                Err(StoreError::Locked { path }) => bail!(
                    "the datastore {path} is held by a running agent: stop every agent before migrating (nothing \
                     may change while the state is copied)"
                ),
                other => Ok(other?),
            }
        }
    };
    let mut out = String::new();
    let result = match (from, to) {
        ("kubernetes", "kubernetes") => bail!("--from and --to are both kubernetes: nothing to copy"),
        (_, "kubernetes") => {
            let source = open(from, true).await?;
            let client = poolwarden::k8s::connect(cli.kubeconfig.as_deref()).await?;
            poolwarden::migrate::to_kubernetes(&source, client, &mut out).await
        }
        ("kubernetes", _) => {
            let client = poolwarden::k8s::connect(cli.kubeconfig.as_deref()).await?;
            let target = open(to, false).await?;
            poolwarden::migrate::from_kubernetes(client, &target, &mut out).await
        }
        _ => bail!(
            "--from {from:?} --to {to:?}: one side must be kubernetes (the API server --kubeconfig reaches); \
             between two etcd or embedded datastores the state is the same layout, copied by etcd's own tools"
        ),
    };
    print!("{out}");
    result?;
    Ok(0)
}

/// How long the agent waits for an embedded datastore another process holds (a `poolwarden` command run
/// while no agent was up holds it for as long as it runs) before it gives up.
const STORE_HELD_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Open the agent's datastore, waiting (up to [`STORE_HELD_WAIT`]) while another process holds the embedded
/// file: a command that happened to run as the agent (re)started must not make it exit.
async fn open_for_agent(cli: &Cli) -> Result<Arc<dyn store::Store>> {
    let deadline = std::time::Instant::now() + STORE_HELD_WAIT;
    let mut waiting = false;
    loop {
        match store::open(&cli.datastore, &cli.etcd_options()).await {
            Err(StoreError::Locked { path }) if std::time::Instant::now() < deadline => {
                if !waiting {
                    tracing::warn!(%path, "the datastore is held by another process; waiting for it (up to {STORE_HELD_WAIT:?})");
                    waiting = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Ok(store) => {
                if waiting {
                    tracing::info!("the datastore was released; starting");
                }
                return Ok(store);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// How often `firewall export --watch` looks again when it cannot watch the datastore itself (the agent
/// holds it, or namespaces come from the API server).
const EXPORT_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Run the command as given through the agent that holds the datastore: (stdout, stderr, exit code).
async fn forward(cli: &Cli, stdin: Option<String>, locked: &StoreError) -> Result<(String, String, u8)> {
    let request = Request::Cli(CliRequest { args: forwarded_args(), stdin });
    // Any size: an export of many pools, or a long listing, is not cut short.
    let reply = poolwarden_protocol::call(&cli.agent_socket, &request, None)
        .await
        .map_err(|e| anyhow::anyhow!("{locked}; and the agent's socket {} did not answer: {e}", cli.agent_socket))?;
    match reply {
        Response::CliOutput { stdout, stderr, exit } => Ok((stdout, stderr, exit)),
        Response::Error(e) => bail!("{}: {}", e.msg, e.details),
        other => bail!("unexpected answer from the agent: {other:?}"),
    }
}

/// Print `text` (at once, not when the buffer fills) unless it is what was printed `last`. A set that the
/// last export defined and this one does not (its pool was deleted) is flushed by this one, before its end.
fn print_if_changed(last: &mut String, text: String) -> Result<()> {
    use poolwarden::firewall;
    use std::io::Write as _;
    if *last != text {
        let now = firewall::sets_in(&text);
        let gone = firewall::sets_in(last).difference(&now).cloned().collect();
        let flush = firewall::flush_gone(&text, &gone);
        match text.strip_suffix(&format!("{}\n", firewall::EXPORT_END)) {
            Some(body) if !flush.is_empty() => println!("{body}{flush}{}", firewall::EXPORT_END),
            _ => print!("{text}"),
        }
        std::io::stdout().flush()?;
        *last = text;
    }
    Ok(())
}

/// Whether the embedded datastore at `path` holds blocks (either layout), or cannot be read to say: an
/// agent kept its IPAM state there. A file without any (an agent that ran there briefly, what a migration
/// away leaves once its blocks went) holds no address.
async fn holds_blocks(cli: &Cli, path: &str) -> bool {
    if !std::path::Path::new(path).exists() {
        return false;
    }
    match store::open_existing(&format!("embedded:{path}"), &cli.etcd_options()).await {
        Ok(store) => poolwarden::catalog::Catalog::new(store).blocks().await.map_or(true, |b| !b.is_empty()),
        Err(_) => true,
    }
}

/// The export of `held`'s pools, printed unless it is what was printed `last`.
async fn export_again(
    held: &commands::Held,
    namespaces: &commands::Namespaces,
    format: poolwarden::firewall::ExportFormat,
    pool: Option<&str>,
    last: &mut String,
) -> Result<()> {
    let text = commands::firewall_export(held, namespaces, format, pool).await.map_err(|e| anyhow::anyhow!(e))?;
    print_if_changed(last, text)
}

/// `firewall export --watch`: print the export, then again each time it changes, until interrupted. With
/// the datastore at hand it wakes on every pool or namespace change; otherwise it asks the agent again
/// every few seconds. Either way it prints only when the text changed.
async fn watch_export(cli: Cli) -> Result<u8> {
    let Command::Firewall { command: FirewallCommand::Export { format, pool, .. } } = &cli.command else {
        return Ok(2);
    };
    let mut last = String::new();
    if cli.datastore == store::KUBERNETES_DATASTORE {
        // Woken by a pool resource changing; namespaces are asked again every few seconds.
        let client = poolwarden::k8s::connect(cli.kubeconfig.as_deref()).await?;
        let pools = Arc::new(poolwarden::k8s::pools::ResourcePools::start(client.clone()));
        let changed = pools.changes();
        let held = commands::Held::Kubernetes { client, pools };
        let namespaces = commands::Namespaces::on_kubernetes(cli.kubeconfig.clone());
        loop {
            export_again(&held, &namespaces, *format, pool.as_deref(), &mut last).await?;
            tokio::select! {
                () = changed.notified() => {}
                () = tokio::time::sleep(EXPORT_POLL) => {}
            }
        }
    }
    match store::open_existing(&cli.datastore, &cli.etcd_options()).await {
        Ok(store) => {
            let held = commands::Held::key_value(Arc::clone(&store));
            let namespaces = commands::Namespaces::new(Arc::clone(&store), None, cli.kubeconfig.clone());
            let mut pools = store.watch(store::keys::POOLS, 0).await?;
            let mut standalone = store.watch(store::keys::NAMESPACES, 0).await?;
            loop {
                export_again(&held, &namespaces, *format, pool.as_deref(), &mut last).await?;
                tokio::select! {
                    event = pools.next() => if event.is_none() { return Ok(0) },
                    event = standalone.next() => if event.is_none() { return Ok(0) },
                    () = tokio::time::sleep(EXPORT_POLL) => {}
                }
            }
        }
        Err(locked @ StoreError::Locked { .. }) => loop {
            let (stdout, stderr, exit) = forward(&cli, None, &locked).await?;
            if exit != 0 {
                eprint!("{stderr}");
                return Ok(exit);
            }
            print_if_changed(&mut last, stdout)?;
            tokio::time::sleep(EXPORT_POLL).await;
        },
        Err(other) => Err(other.into()),
    }
}
