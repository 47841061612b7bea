//! Whatever a client writes on the agent's socket, the agent's decoder either refuses it with code 6 or
//! accepts a request that re-encodes and decodes to the same request; it never panics. An accepted ADD or DEL
//! whose container ID and interface name pass the spec's rules names a host interface no longer than Linux
//! allows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use poolwarden_protocol::{Request, decode_request, host_ifname, validate_container_id, validate_ifname};

fuzz_target!(|data: &[u8]| {
    match decode_request(data) {
        Ok(request) => {
            let again = decode_request(&serde_json::to_vec(&request).expect("encode")).expect("re-decode");
            assert_eq!(again, request);
            let attachment = match &request {
                Request::Add(add) => Some((&add.container_id, &add.ifname)),
                Request::Del(del) => Some((&del.container_id, &del.ifname)),
                Request::Check(check) => Some((&check.container_id, &check.ifname)),
                _ => None,
            };
            if let Some((id, ifname)) = attachment
                && validate_container_id(id).is_ok()
                && validate_ifname(ifname).is_ok()
            {
                assert!(validate_ifname(&host_ifname(id, ifname)).is_ok());
            }
        }
        Err(refusal) => assert_eq!(refusal.code, 6, "{refusal:?}"),
    }
});
