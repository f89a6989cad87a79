//! What the store's scripts cost Redis beyond the commands they run, for `redis-calls
//! --callgrind`.
//!
//! Redis runs a script's commands through Lua: the call's keys and arguments become Lua
//! strings, each `redis.call` turns its arguments back into Redis objects and its reply into Lua
//! values, and the script's own logic runs in between. To price that against the commands
//! themselves, the same calls are made once more on a private Redis that `MONITOR` watches (it
//! logs each command a script runs, in order, after the call that ran it), and what each call
//! ran is replayed into fresh Redis servers under callgrind in each [`Replay`] way. Every replay
//! leaves the same keys and values as the calls, so the instructions compare like for like.

use crate::private_redis::PrivateRedis;
use crate::redis_calls::Workload;
use futures_util::StreamExt;
use laabam_tests::TestEnv;
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// How the commands a script ran are sent again.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Replay {
    /// The calls as the store made them: the scripts, run by Redis's Lua.
    Scripts,
    /// Each call's commands as one MULTI/EXEC transaction: atomic as a script is, without Lua.
    Transactions,
    /// As a transaction under WATCH of the keys a script reads to decide (the endpoints'
    /// version and the event at an arrival, the delivery's state at a record), with the
    /// script's reads sent before it: what a store without Lua would send to keep each step
    /// exactly as atomic (a watched key changed meanwhile fails the transaction, to be tried
    /// again).
    Watched,
    /// The script's reads and the event's store-if-absent in a small script per call, the
    /// rest as a MULTI/EXEC transaction after it: decisions made where they are atomic without
    /// WATCH (and so without a connection of their own), at Lua's price for those alone.
    Decided,
}

impl Replay {
    pub(crate) const ALL: [Replay; 4] = [Replay::Scripts, Replay::Transactions, Replay::Watched, Replay::Decided];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Replay::Scripts => "as scripts",
            Replay::Transactions => "as MULTI/EXEC",
            Replay::Watched => "as WATCH, reads, MULTI/EXEC",
            Replay::Decided => "as a script of the reads and SET NX, then MULTI/EXEC",
        }
    }
}

/// One command: its name and arguments.
type Command = Vec<Vec<u8>>;

/// A command the store sent, and the commands Redis ran for it if it called a script.
#[derive(Debug, PartialEq)]
struct Call {
    sent: Command,
    ran: Vec<Command>,
}

/// Marks the end of a step in the watched Redis's log.
const STEP_END: &str = "laabam-bench: step done";

/// The calls of `redis-calls`' steps, in the order Redis ran them.
pub(crate) struct Captured {
    setup: Vec<Call>,
    begin: Vec<Call>,
    record: Vec<Call>,
}

impl Captured {
    /// Runs the `n` deliveries of `width` endpoints each on a private Redis under `MONITOR`.
    pub(crate) async fn of(n: usize, width: usize) -> Self {
        let redis = PrivateRedis::start_plain().await;
        let mut env = TestEnv::new().await;
        env.redis_url = redis.url.clone();
        let client = redis::Client::open(redis.url.as_str()).expect("Redis URL");
        let monitor = client.get_async_monitor().await.expect("MONITOR");
        let mut ends = 0;
        let lines = tokio::spawn(
            monitor
                .into_on_message::<String>()
                .take_while(move |line| {
                    ends += usize::from(line.contains(STEP_END));
                    futures_util::future::ready(ends < 3)
                })
                .collect::<Vec<String>>(),
        );
        let mut marker = client.get_multiplexed_async_connection().await.expect("Redis");
        let mut step_done = async || {
            let _: String = redis::cmd("ECHO").arg(STEP_END).query_async(&mut marker).await.unwrap();
        };
        let store = env.store().await;
        let workload = Workload::prepare(&store, n, width).await;
        step_done().await;
        workload.begin(&store).await;
        step_done().await;
        workload.record(&store).await;
        step_done().await;
        let lines = lines.await.expect("the watch ends");
        redis.stop().await;
        let mut steps = calls(&lines).into_iter();
        let mut next = || steps.next().expect("three steps");
        Captured {
            setup: next(),
            begin: next(),
            record: next(),
        }
    }

    /// Replays the steps into a Redis under callgrind.
    pub(crate) async fn replay(&self, how: Replay) -> Replayed {
        let mut redis = PrivateRedis::start().await;
        let port = redis.port;
        send(port, encode(&self.setup, how)).await;
        redis.zero();
        let mut parse = Duration::ZERO;
        let mut step = async |calls: &[Call]| {
            let (commands, replies) = encode(calls, how);
            let answered = send(port, (commands, replies)).await;
            parse += parse_time(&answered, replies);
            redis.phase()
        };
        let begin = step(&self.begin).await;
        let record = step(&self.record).await;
        redis.stop().await;
        Replayed { begin, record, parse }
    }
}

/// What a replay cost: Redis's instructions for the arrivals and for the records, and the time
/// a client takes to read their replies.
pub(crate) struct Replayed {
    pub(crate) begin: u64,
    pub(crate) record: u64,
    pub(crate) parse: Duration,
}

/// The calls in a `MONITOR` log, split into steps at each [`STEP_END`]. A call to a script
/// Redis did not have yet ran nothing (`NOSCRIPT`) and was made again after loading it, so it
/// is left out.
fn calls(lines: &[String]) -> Vec<Vec<Call>> {
    let mut steps: Vec<Vec<Call>> = vec![Vec::new()];
    for line in lines {
        let Some((from_script, command)) = parse_line(line) else {
            continue;
        };
        let step = steps.last_mut().expect("a step");
        if from_script {
            if let Some(call) = step.last_mut() {
                call.ran.push(command);
            }
        } else if line.contains(STEP_END) {
            steps.push(Vec::new());
        } else {
            step.push(Call {
                sent: command,
                ran: Vec::new(),
            });
        }
    }
    for step in &mut steps {
        step.retain(|call| !(is(&call.sent, "EVALSHA") && call.ran.is_empty()));
    }
    steps
}

fn is(command: &Command, name: &str) -> bool {
    command.first().is_some_and(|n| n.eq_ignore_ascii_case(name.as_bytes()))
}

/// A `MONITOR` line (`1796634275.353682 [0 lua] "SET" "k" "v"`): whether a script ran the
/// command, and the command, its arguments unquoted as Redis quotes them (`\"`, `\\`, `\n`,
/// `\r`, `\t`, `\a`, `\b`, `\xHH`).
fn parse_line(line: &str) -> Option<(bool, Command)> {
    let (_, rest) = line.split_once(" [")?;
    let (source, quoted) = rest.split_once("] ")?;
    let bytes = quoted.as_bytes();
    let mut command = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b' ' => i += 1,
            b'"' => {
                let mut arg = Vec::new();
                i += 1;
                loop {
                    match *bytes.get(i)? {
                        b'"' => break,
                        b'\\' => {
                            let (byte, used) = match *bytes.get(i + 1)? {
                                b'x' => (u8::from_str_radix(quoted.get(i + 2..i + 4)?, 16).ok()?, 4),
                                b'n' => (b'\n', 2),
                                b'r' => (b'\r', 2),
                                b't' => (b'\t', 2),
                                b'a' => (7, 2),
                                b'b' => (8, 2),
                                other => (other, 2),
                            };
                            arg.push(byte);
                            i += used;
                        }
                        byte => {
                            arg.push(byte);
                            i += 1;
                        }
                    }
                }
                command.push(arg);
                i += 1;
            }
            _ => return None,
        }
    }
    (!command.is_empty()).then(|| (source.ends_with(" lua"), command))
}

/// A script's reads: sent before the transaction, since nothing inside one can be read.
fn reads(command: &Command) -> bool {
    ["GET", "HMGET", "HGET", "ZCARD", "EXISTS", "ZRANGE"]
        .iter()
        .any(|name| is(command, name))
}

/// A write made only if its key is absent (`SET … NX`): an event's first copy.
fn only_if_absent(command: &Command) -> bool {
    is(command, "SET") && command.iter().skip(3).any(|a| a.eq_ignore_ascii_case(b"NX"))
}

/// Runs the commands its arguments list, each as its number of words and then the words: the
/// decisions of a [`Replay::Decided`] call.
const RUN_LISTED: &str = "local i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 0
";

/// The keys a script's decision rests on: those it reads with `GET` or `HMGET`, and an event
/// it stores only if absent.
fn decided_by(ran: &[Command]) -> Vec<&[u8]> {
    let mut keys: Vec<&[u8]> = Vec::new();
    for command in ran {
        if (is(command, "GET") || is(command, "HMGET") || only_if_absent(command))
            && let Some(key) = command.get(1)
            && !keys.contains(&key.as_slice())
        {
            keys.push(key);
        }
    }
    keys
}

/// A step's calls as `how` sends them, in RESP, with the number of replies they get.
fn encode(calls: &[Call], how: Replay) -> (Vec<u8>, usize) {
    let mut out = (Vec::new(), 0);
    let mut put = |command: &Command| {
        out.0.extend_from_slice(&redis::pack_command(command));
        out.1 += 1;
    };
    let word = |w: &str| vec![w.as_bytes().to_vec()];
    for call in calls {
        if matches!(how, Replay::Scripts) || call.ran.is_empty() {
            if matches!(how, Replay::Scripts) || !is(&call.sent, "SCRIPT") {
                put(&call.sent);
            }
            continue;
        }
        if matches!(how, Replay::Watched) {
            let keys = decided_by(&call.ran);
            if !keys.is_empty() {
                put(&word("WATCH")
                    .into_iter()
                    .chain(keys.into_iter().map(<[u8]>::to_vec))
                    .collect());
            }
            call.ran.iter().filter(|c| reads(c)).for_each(&mut put);
        }
        let decides = |c: &Command| reads(c) || only_if_absent(c);
        if matches!(how, Replay::Decided) {
            let mut eval = vec![b"EVAL".to_vec(), RUN_LISTED.as_bytes().to_vec(), b"0".to_vec()];
            for c in call.ran.iter().filter(|c| decides(c)) {
                eval.push(c.len().to_string().into_bytes());
                eval.extend(c.iter().cloned());
            }
            put(&eval);
        }
        put(&word("MULTI"));
        call.ran
            .iter()
            .filter(|c| match how {
                Replay::Watched => !reads(c),
                Replay::Decided => !decides(c),
                Replay::Scripts | Replay::Transactions => true,
            })
            .for_each(&mut put);
        put(&word("EXEC"));
    }
    out
}

/// Writes `commands` to the Redis on `port` and reads their replies, all of them, so that
/// what follows counts from a Redis that has run them; returns the replies as they came.
async fn send(port: u16, (commands, replies): (Vec<u8>, usize)) -> Vec<u8> {
    tokio::task::spawn_blocking(move || {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("the private Redis");
        let mut writer = stream.try_clone().expect("a second handle");
        let writing = std::thread::spawn(move || writer.write_all(&commands).expect("commands sent"));
        let mut reader = BufReader::new(Kept {
            stream,
            bytes: Vec::new(),
        });
        let mut parser = redis::Parser::new();
        for _ in 0..replies {
            parser.parse_value(&mut reader).expect("a reply");
        }
        writing.join().expect("the writer");
        reader.into_inner().bytes
    })
    .await
    .expect("the replay")
}

/// A stream that keeps what was read from it.
struct Kept {
    stream: TcpStream,
    bytes: Vec<u8>,
}

impl Read for Kept {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.stream.read(buf)?;
        self.bytes.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// What reading `replies` costs a client: the time redis' own parser takes over their bytes,
/// the best of five (it runs here alone, so the best is the least disturbed).
fn parse_time(bytes: &[u8], replies: usize) -> Duration {
    (0..5)
        .map(|_| {
            let started = Instant::now();
            let mut parser = redis::Parser::new();
            let mut rest = bytes;
            for _ in 0..replies {
                parser.parse_value(&mut rest).expect("a reply read before");
            }
            started.elapsed()
        })
        .min()
        .expect("five runs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_monitor_line_is_unquoted_as_redis_quotes_it() {
        let line = r#"1796634275.353682 [0 lua] "HSET" "k\"1" "a\\b\n\x00\xff" """#;
        let (from_script, command) = parse_line(line).unwrap();
        assert!(from_script);
        assert_eq!(
            command,
            vec![
                b"HSET".to_vec(),
                b"k\"1".to_vec(),
                b"a\\b\n\x00\xff".to_vec(),
                Vec::new()
            ]
        );
        let (from_script, command) = parse_line(r#"1.2 [0 127.0.0.1:4000] "PING""#).unwrap();
        assert!(!from_script);
        assert_eq!(command, vec![b"PING".to_vec()]);
    }

    #[test]
    fn a_script_call_keeps_what_it_ran_and_a_refused_one_is_left_out() {
        let lines = [
            r#"1 [0 127.0.0.1:1] "EVALSHA" "abc" "0""#,
            r#"1 [0 127.0.0.1:1] "SCRIPT" "LOAD" "return 1""#,
            r#"1 [0 127.0.0.1:1] "EVALSHA" "abc" "0""#,
            r#"1 [0 lua] "GET" "v""#,
            r#"1 [0 lua] "SET" "e" "x" "NX" "EX" "60""#,
            r#"1 [0 127.0.0.1:2] "ECHO" "laabam-bench: step done""#,
            r#"1 [0 127.0.0.1:1] "PING""#,
        ]
        .map(String::from);
        let steps = calls(&lines);
        assert_eq!(steps.len(), 2);
        let sent: Vec<&[u8]> = steps[0].iter().map(|c| c.sent[0].as_slice()).collect();
        assert_eq!(sent, [b"SCRIPT".as_slice(), b"EVALSHA"]);
        assert_eq!(steps[0][1].ran.len(), 2);
        assert_eq!(decided_by(&steps[0][1].ran), [b"v".as_slice(), b"e"]);
        let (watched, replies) = encode(&steps[0], Replay::Watched);
        assert_eq!(
            replies, 5,
            "WATCH, the read, MULTI, the write, EXEC; SCRIPT LOAD is not sent"
        );
        assert!(watched.starts_with(b"*3\r\n$5\r\nWATCH\r\n$1\r\nv\r\n$1\r\ne\r\n*2\r\n$3\r\nGET"));
        assert_eq!(encode(&steps[0], Replay::Scripts).1, 2);
        assert_eq!(encode(&steps[0], Replay::Transactions).1, 4);
        let (decided, replies) = encode(&steps[0], Replay::Decided);
        assert_eq!(replies, 3, "the script of the read and the SET NX, MULTI, EXEC");
        let listed = b"$1\r\n2\r\n$3\r\nGET\r\n$1\r\nv\r\n$1\r\n6\r\n$3\r\nSET\r\n$1\r\ne\r\n";
        assert!(
            decided.windows(listed.len()).any(|w| w == listed),
            "each command with its length"
        );
    }
}
