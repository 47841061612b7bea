//! Any selector text parses or fails with a position inside the input, never panics; a parsed selector
//! evaluates without panicking and parses again from its own text to the same meaning.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use poolwarden::resources::Selector;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Selector::parse(text) {
        Ok(selector) => {
            let labels: BTreeMap<String, String> = [("a", "1"), ("zone", "x"), ("kubernetes.io/os", "linux")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let verdict = selector.matches(&labels);
            let again = Selector::parse(selector.as_str()).expect("a selector's own text parses");
            assert_eq!(again.matches(&labels), verdict);
        }
        Err(err) => assert!(err.position >= 1 && err.position <= text.chars().count() + 1, "{err}"),
    }
});
