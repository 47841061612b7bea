//! The `poolwarden` command: define pools, inspect and repair IPAM, manage standalone namespaces, and run
//! the node agent. While an agent holds the embedded datastore, commands are forwarded to it over its socket.

use std::{process::ExitCode, sync::Arc};

use anyhow::{Result, bail};
use clap::Parser;
use poolwarden::{
    commands::{self, Cli, Command, LogFormat},
    ipam::NodeInfo,
    store::{self, StoreError},
};
use poolwarden_cni::protocol::{CliRequest, Request, Response};

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
        metrics_addr,
        log_format,
        enforcement,
        bpf_dir,
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
        let store = store::open(&cli.datastore, &cli.etcd_options()).await?;
        let agent = Arc::new(poolwarden::daemon::Agent::new(
            node,
            store,
            *enforcement,
            bpf_dir,
            node_address.clone(),
            poolwarden::daemon::Lifetimes { leak_grace: leak_grace_period.0, registration_ttl: registration_ttl.0 },
        )?);
        poolwarden::daemon::server::run(agent, socket.clone(), *metrics_addr).await?;
        return Ok(0);
    }
    let stdin = if reads_stdin(&cli) { Some(std::io::read_to_string(std::io::stdin().lock())?) } else { None };
    match store::open(&cli.datastore, &cli.etcd_options()).await {
        Ok(store) => {
            let mut out = String::new();
            let result = commands::execute(cli, store, stdin, &mut out).await;
            print!("{out}");
            result.map_err(|e| anyhow::anyhow!(e))
        }
        Err(locked @ StoreError::Locked { .. }) => {
            let request = Request::Cli(CliRequest { args: forwarded_args(), stdin });
            let reply = poolwarden_cni::plugin::call_agent(&cli.agent_socket, &request).await.map_err(|e| {
                anyhow::anyhow!("{locked}; and the agent's socket {} did not answer: {}", cli.agent_socket, e.details)
            })?;
            match reply {
                Response::CliOutput { stdout, stderr, exit } => {
                    print!("{stdout}");
                    eprint!("{stderr}");
                    Ok(exit)
                }
                Response::Error(e) => bail!("{}: {}", e.msg, e.details),
                other => bail!("unexpected answer from the agent: {other:?}"),
            }
        }
        Err(other) => Err(other.into()),
    }
}
