//! Any text given to `poolwarden apply -f` yields documents or an error, never a panic; and every accepted
//! pool passes validation again after a YAML round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use poolwarden::resources::{Resource, parse_documents, to_yaml_documents};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(docs) = parse_documents("fuzz.yaml", text) else { return };
    let pools: Vec<_> = docs
        .iter()
        .filter_map(|d| match &d.resource {
            Resource::IpPool(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    let again = parse_documents("again.yaml", &to_yaml_documents("IPPool", &pools)).expect("printed pools parse back");
    assert_eq!(again.len(), pools.len());
    for (doc, pool) in again.iter().zip(&pools) {
        assert_eq!(doc.resource, Resource::IpPool(pool.clone()), "round trip changed the pool");
    }
});
