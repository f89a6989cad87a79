//! Script calls built as one `EVALSHA` command.
//!
//! redis' `ScriptInvocation` keeps each key and argument in a buffer of its own and copies them
//! all into a new command on every call: about fifty allocations for one record, a twentieth of
//! the dispatcher's time in the `fanout` benchmark. A `Cmd` writes them into one buffer. The
//! number of keys, which `EVALSHA` wants before them, is given up front and checked.

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisResult, Script, ServerErrorKind, ToRedisArgs};

pub(super) struct ScriptCall<'a> {
    script: &'a Script,
    cmd: Cmd,
    keys_left: usize,
}

impl<'a> ScriptCall<'a> {
    /// A call of `script` with `keys` keys, added with [`ScriptCall::key`] before any argument.
    pub(super) fn new(script: &'a Script, keys: usize) -> Self {
        let mut cmd = Cmd::new();
        cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
        ScriptCall {
            script,
            cmd,
            keys_left: keys,
        }
    }

    pub(super) fn key(&mut self, key: impl ToRedisArgs) -> &mut Self {
        assert!(self.keys_left > 0, "more keys than the call was made for");
        self.keys_left -= 1;
        self.cmd.arg(key);
        self
    }

    pub(super) fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        assert_eq!(self.keys_left, 0, "every key comes before the arguments");
        self.cmd.arg(arg);
        self
    }

    /// Runs the call, loading the script first when Redis does not know it (after a restart or
    /// a `SCRIPT FLUSH`).
    pub(super) async fn invoke<T: FromRedisValue>(&self, con: &mut impl ConnectionLike) -> RedisResult<T> {
        assert_eq!(self.keys_left, 0, "fewer keys than the call was made for");
        match self.cmd.query_async(con).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.script.load_async(con).await?;
                self.cmd.query_async(con).await
            }
            result => result,
        }
    }
}
