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
    /// The arguments and bytes the buffers were made for (redis keeps `Cmd::capacity` private).
    #[cfg(test)]
    sized_for: (usize, usize),
}

impl<'a> ScriptCall<'a> {
    /// A call of `script` with `keys` keys, added with [`ScriptCall::key`] before any argument.
    pub(super) fn new(script: &'a Script, keys: usize) -> Self {
        Self::with_capacity(script, keys, 0, 0)
    }

    /// A call whose keys and arguments, `args` in all of `bytes` bytes together, are known
    /// beforehand: its buffers are made once instead of regrowing (and copying what they hold)
    /// as a batch of hundreds of keys is written into them.
    pub(super) fn with_capacity(script: &'a Script, keys: usize, args: usize, bytes: usize) -> Self {
        let hash = script.get_hash();
        let digits = keys.checked_ilog10().map_or(1, |d| d as usize + 1);
        let sized_for = (3 + args, "EVALSHA".len() + hash.len() + digits + bytes);
        let mut cmd = Cmd::with_capacity(sized_for.0, sized_for.1);
        cmd.arg("EVALSHA").arg(hash).arg(keys);
        ScriptCall {
            script,
            cmd,
            keys_left: keys,
            #[cfg(test)]
            sized_for,
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

    /// Whether the command's buffers were made for exactly what was written: neither short
    /// (they regrew) nor long.
    #[cfg(test)]
    pub(super) fn fills_its_buffers(&self) -> bool {
        let bytes = self.cmd.args_iter().map(|arg| match arg {
            redis::Arg::Simple(bytes) => bytes.len(),
            _ => 0,
        });
        self.sized_for == (self.cmd.args_iter().len(), bytes.sum())
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
