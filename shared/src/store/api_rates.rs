//! The API's request rate per caller, counted for the whole deployment: producers are
//! stateless replicas behind one address, and a rate each kept alone would let a caller make
//! the limit times the number of replicas.

use super::script_call::ScriptCall;
use super::{Store, StoreError};
use redis::Script;
use std::sync::LazyLock;
use std::time::Duration;

static API_RATE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/api_rate.lua")));

impl Store {
    /// Spends one of `caller`'s requests at `per_sec` a second with bursts of `burst`, or says
    /// how long until one is allowed. The bucket's key lasts until it would be full again.
    pub async fn spend_api_request(
        &self,
        caller: &str,
        per_sec: f64,
        burst: f64,
    ) -> Result<Option<Duration>, StoreError> {
        let mut call = ScriptCall::new(&API_RATE, 1);
        call.key(self.keys.api_rate(caller))
            .arg(1_000_000.0 / per_sec)
            .arg(burst);
        let wait_us: u64 = call.invoke(&mut self.conn()).await?;
        Ok((wait_us > 0).then(|| Duration::from_micros(wait_us)))
    }
}
