//! Whatever a runtime passes as the network configuration and `CNI_ARGS`, the plugin's parsing either
//! accepts it or fails with a spec error code, never panics; an accepted configuration re-encodes and parses
//! to the same meaning.
#![no_main]

use libfuzzer_sys::fuzz_target;
use poolwarden_cni::plugin::{mode, parse_cni_args, parse_conf};

fuzz_target!(|data: &[u8]| {
    let (conf, args) = match data.iter().position(|&b| b == 0) {
        Some(split) => (&data[..split], &data[split + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(args) = std::str::from_utf8(args) {
        if let Err(e) = parse_cni_args(args) {
            assert_eq!(e.code, 4, "CNI_ARGS errors are code 4: {e:?}");
        }
    }
    match parse_conf(conf) {
        Ok(parsed) => {
            let _ = mode(&parsed);
            let again = parse_conf(&serde_json::to_vec(&parsed).expect("encode")).expect("re-parse");
            assert_eq!(again.cni_version, parsed.cni_version);
            assert_eq!(again.options, parsed.options);
            assert_eq!(again.ipam, parsed.ipam);
        }
        Err(e) => assert!([1, 6, 7].contains(&e.code), "netconf errors are 1, 6 or 7: {e:?}"),
    }
});
