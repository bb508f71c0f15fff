//! One script call written straight into one `EVALSHA` command.
//!
//! redis-rs's `ScriptInvocation` keeps each key and argument in a buffer of its own and
//! copies them all into a command when it is sent: about 10 allocations per request more
//! than this (callgrind, quickstart policies on Redis, 200 req/s).
//! A [`Call`] writes `EVALSHA <sha> <number of keys>`, the keys, then the arguments into
//! one command buffer as they come. So a caller adds every key first, and states how many
//! up front. A call whose keys do not add up to that number is refused unsent (a client
//! error), never sent with its arguments taken for keys.
//!
//! If the server does not know the script (`NOSCRIPT`: first use, a `SCRIPT FLUSH`, a
//! restart), the call loads it with `SCRIPT LOAD` and sends the same command once more,
//! as `ScriptInvocation` does.

use ::redis::aio::ConnectionLike;
use ::redis::{
    Cmd, ErrorKind, FromRedisValue, RedisError, RedisResult, Script, ServerErrorKind, ToRedisArgs,
};

pub(crate) struct Call {
    script: &'static Script,
    cmd: Cmd,
    /// Keys still to come before the first argument.
    keys_left: usize,
    /// A key came after an argument, or more keys than announced.
    misordered: bool,
}

impl Call {
    /// A call of `script` with `keys` keys and, roughly, `args` arguments (a capacity
    /// hint only).
    pub(crate) fn new(script: &'static Script, keys: usize, args: usize) -> Self {
        // Room for keys of about 100 bytes and arguments of about 32 (numbers, counter
        // ids), so a usual call is written without growing its buffer.
        let mut cmd = Cmd::with_capacity(3 + keys + args, 64 + 100 * keys + 32 * args);
        cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
        Self {
            script,
            cmd,
            keys_left: keys,
            misordered: false,
        }
    }

    /// Add a key (`KEYS[i]`). Every key comes before the first argument.
    pub(crate) fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        match self.keys_left.checked_sub(1) {
            Some(left) => self.keys_left = left,
            None => self.misordered = true,
        }
        self.cmd.arg(key);
        self
    }

    /// Add an argument (`ARGV[i]`).
    pub(crate) fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        if self.keys_left > 0 {
            self.misordered = true;
        }
        self.cmd.arg(arg);
        self
    }

    /// Send the call on `conn`; on `NOSCRIPT`, load the script and send it again.
    pub(crate) async fn invoke<T: FromRedisValue, C: ConnectionLike>(
        &self,
        conn: &mut C,
    ) -> RedisResult<T> {
        if self.misordered || self.keys_left > 0 {
            return Err(RedisError::from((
                ErrorKind::Client,
                "script call built with its keys out of place",
            )));
        }
        match self.cmd.query_async(conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.script.load_async(conn).await?;
                self.cmd.query_async(conn).await
            }
            result => result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static ECHO: std::sync::LazyLock<Script> =
        std::sync::LazyLock::new(|| Script::new("return {KEYS[1], ARGV[1]}"));

    fn words(call: &Call) -> Vec<Vec<u8>> {
        call.cmd
            .args_iter()
            .map(|a| match a {
                ::redis::Arg::Simple(b) => b.to_vec(),
                _ => b"<not a plain argument>".to_vec(),
            })
            .collect()
    }

    #[test]
    fn writes_evalsha_the_key_count_the_keys_then_the_arguments() {
        let mut call = Call::new(&ECHO, 2, 2);
        call.key("k1").key("k2").arg(7u64).arg("x");
        let hash = ECHO.get_hash().as_bytes().to_vec();
        assert_eq!(
            words(&call),
            vec![
                b"EVALSHA".to_vec(),
                hash,
                b"2".to_vec(),
                b"k1".to_vec(),
                b"k2".to_vec(),
                b"7".to_vec(),
                b"x".to_vec()
            ]
        );
        assert!(!call.misordered);
        assert_eq!(call.keys_left, 0);
    }

    #[test]
    fn keys_out_of_place_are_caught() {
        let mut late = Call::new(&ECHO, 1, 1);
        late.arg(1u64).key("k");
        assert!(late.misordered);
        let mut extra = Call::new(&ECHO, 1, 0);
        extra.key("a").key("b");
        assert!(extra.misordered);
        let mut short = Call::new(&ECHO, 2, 0);
        short.key("a");
        assert_eq!(short.keys_left, 1);
    }
}
