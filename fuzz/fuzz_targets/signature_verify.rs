#![no_main]
//! Hostile signature headers, timestamps and secrets: verification never panics and never
//! accepts a header it did not make.
use laabam_shared::signing::{DEFAULT_TOLERANCE, Secret, verify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (header, ts, secret) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let _ = Secret::parse(secret);
    let key = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    let accepted = verify(&key, "msg", ts, header, data, 1_614_265_330, DEFAULT_TOLERANCE).is_ok();
    if accepted {
        // Only a real signature over exactly these bytes may pass.
        let expected = key.sign("msg", ts.trim().parse().unwrap(), data);
        assert!(header.split_whitespace().any(|s| s == expected), "accepted a forged signature");
    }
});
