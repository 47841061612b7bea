//! `poolwarden-cni`: executed by the container runtime with `CNI_COMMAND` and the network configuration.

use std::{collections::HashMap, io::Read, process::ExitCode};

use poolwarden_cni::plugin::{Invocation, run};

fn main() -> ExitCode {
    let env: HashMap<String, String> = std::env::vars().collect();
    let mut stdin = Vec::new();
    if env.get("CNI_COMMAND").is_some_and(|c| c != "VERSION") {
        let _ = std::io::stdin().read_to_end(&mut stdin);
    }
    let code = run(&Invocation { env: &env, stdin: &stdin }, &mut std::io::stdout().lock());
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
