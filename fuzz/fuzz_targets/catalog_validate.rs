#![no_main]
//! Any JSON value as a payload of every catalog type: validation never panics.
use laabam_shared::catalog::CATALOG;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(raw) = RawValue::from_string(text.to_owned()) else { return };
    for spec in CATALOG {
        let _ = spec.validate(&raw);
    }
});
