#![no_main]
//! Any bytes, as a publisher might send them: parsing never panics, and what parses re-encodes
//! to something that parses to the same event.
use laabam_shared::envelope::{Envelope, Provenance};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let provenance = Provenance {
        message_id: data.first().map(|b| format!("m{b}")),
        amqp_timestamp: None,
        routing_key: Some("invoice.paid".into()),
    };
    if let Ok(env) = Envelope::parse(data, &provenance, 0) {
        let again = Envelope::parse(&env.to_json(), &Provenance::default(), 0).expect("re-encoded events parse");
        assert_eq!(again.to_json(), env.to_json());
    }
});
