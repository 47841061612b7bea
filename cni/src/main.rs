//! `poolwarden-cni`: executed by the container runtime with `CNI_COMMAND` and the network configuration.

use std::{collections::HashMap, io::Read, process::ExitCode};

use poolwarden_cni::plugin::{Invocation, MAX_STDIN, run};

fn main() -> ExitCode {
    // Read as bytes: a variable that is not UTF-8 is refused if it is a CNI one and ignored otherwise, never a
    // panic.
    let mut env: HashMap<String, String> = HashMap::new();
    let mut unreadable = Vec::new();
    for (name, value) in std::env::vars_os() {
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => {
                env.insert(name, value);
            }
            (Ok(name), Err(_)) if name.starts_with("CNI_") => unreadable.push(name),
            (Err(name), _) if name.as_encoded_bytes().starts_with(b"CNI_") => {
                unreadable.push(name.to_string_lossy().into_owned());
            }
            _ => {}
        }
    }
    let mut stdin = Vec::new();
    if env.get("CNI_COMMAND").is_some_and(|c| c != "VERSION") {
        // One byte more than the plugin accepts, so that a larger configuration is refused, not cut.
        let _ = std::io::stdin().take(MAX_STDIN as u64 + 1).read_to_end(&mut stdin);
    }
    let invocation = Invocation { env: &env, stdin: &stdin, unreadable: &unreadable };
    let code = run(&invocation, &mut std::io::stdout().lock());
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
