//! The API's request rate per caller, counted for the whole deployment: producers are
//! stateless replicas behind one address, and a rate each kept alone would let a caller make
//! the limit times the number of replicas.

use super::script_call::ScriptCall;
use super::{Store, StoreError};
use crate::ids::AccountId;
use redis::Script;
use std::sync::LazyLock;
use std::time::Duration;

static API_RATE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/api_rate.lua")));

/// What spending a request found.
#[derive(Debug)]
pub struct Spent {
    /// How long until the caller may make its next request, when this one was over its rate.
    pub wait: Option<Duration>,
    /// The account of the API key looked up with it, when one was given and is valid.
    pub account: Option<AccountId>,
}

impl Store {
    /// Spends one of `caller`'s requests at `per_sec` a second with bursts of `burst`, or says
    /// how long until one is allowed; in the same round trip, looks `api_key` up as
    /// [`Store::authenticate`] would. The bucket's key lasts until it would be full again.
    pub async fn spend_api_request(
        &self,
        caller: &str,
        per_sec: f64,
        burst: f64,
        api_key: Option<&str>,
    ) -> Result<Spent, StoreError> {
        let entry = api_key.and_then(|key| self.api_key_entry(key));
        let mut call = ScriptCall::new(&API_RATE, 1 + usize::from(entry.is_some()));
        call.key(self.keys.api_rate(caller));
        if let Some(entry) = entry {
            call.key(entry);
        }
        call.arg(1_000_000.0 / per_sec).arg(burst);
        let (wait_us, account): (u64, Option<String>) = call.invoke(&mut self.conn()).await?;
        Ok(Spent {
            wait: (wait_us > 0).then(|| Duration::from_micros(wait_us)),
            account: account.and_then(|a| AccountId::parse(a).ok()),
        })
    }
}
