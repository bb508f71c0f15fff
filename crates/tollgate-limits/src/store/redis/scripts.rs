//! The Lua scripts. Each runs atomically on one Redis node, and every key one call
//! touches shares one hash tag (see `keys.rs`), so they also run on a cluster.
//!
//! State of one counter-window (a hash, `KEYS[2i-1]` below):
//! `y` type (`f` fixed window, `b` bucket, `c` concurrency), `id` counter id, `k` kind
//! (`t` tokens, `r` requests, `i` in flight), `lim` limit (a bucket's refill per period),
//! `r` units held by reservations, `a<reservation>` one reservation's hold;
//! fixed: `s`/`e` window start/end, `v` value; bucket: `d` deficit in 1/`pm` token,
//! `at` when refilled last, `pm` period in ms, `bu` burst.
//! Beside it (`KEYS[2i]`): the holds, a sorted set of reservation ids scored by deadline.
//!
//! Conventions:
//! - Time is the engine's `now` (ARGV), never Redis `TIME`, so an injected clock works.
//!   Expiry timestamps (`PEXPIREAT`) are absolute milliseconds of that clock: window end
//!   plus settlement grace for windows; for buckets, when full again; for concurrency
//!   counters, the latest hold deadline (both plus grace). A clock far from real time makes
//!   keys expire early (already-past timestamps delete the key at once) or late; the
//!   scripts themselves judge "past its grace" by `now`, so late expiry changes nothing.
//! - Numbers are Lua doubles: exact up to 2^53 - 1 (`MAX`). The Rust side caps every
//!   argument there; sums saturate there. Values go back to Redis through `str`
//!   (`%d`), never through Lua's own number formatting (`1e+15`).
//! - A write never creates a key without setting its expiry: helpers that update in
//!   place check `EXISTS` first, and every creating path ends in `expire`.
//! - Scripts never fail half-way on valid input (Redis does not roll a script back).

/// Shared helpers, prepended to every script.
macro_rules! helpers {
    () => {
        r#"
local MAX = 9007199254740991
local function num(x) return tonumber(x) or 0 end
local function str(n) return string.format('%d', n) end
local function cap(n) if n > MAX then return MAX elseif n < 0 then return 0 end return n end
-- Add n (either sign) to integer field f, saturating at 0 and MAX. Returns the result.
local function incr(h, f, n)
  local v = redis.call('HINCRBY', h, f, str(n))
  if v > MAX then v = MAX elseif v < 0 then v = 0 else return v end
  redis.call('HSET', h, f, str(v))
  return v
end
-- floor(a / b) for integers 0 <= a <= MAX, b >= 1, corrected for rounding.
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end
local function cdiv(a, b)
  local q = idiv(a, b)
  if q * b < a then q = q + 1 end
  return q
end
local function expire(h, z, at)
  local t = str(cap(at))
  redis.call('PEXPIREAT', h, t)
  redis.call('PEXPIREAT', z, t)
end
-- Release the holds whose deadline is not after now. Returns how many.
local function purge(h, z, now)
  local due = redis.call('ZRANGEBYSCORE', z, '-inf', str(now))
  if #due == 0 then return 0 end
  local r = num(redis.call('HGET', h, 'r'))
  for _, m in ipairs(due) do
    r = r - num(redis.call('HGET', h, 'a' .. m))
    redis.call('HDEL', h, 'a' .. m)
  end
  redis.call('ZREMRANGEBYSCORE', z, '-inf', str(now))
  if redis.call('EXISTS', h) == 1 then redis.call('HSET', h, 'r', str(cap(r))) end
  return #due
end
-- Release one reservation's hold. Returns 1 if it was still held.
local function release(h, z, rid)
  local f = 'a' .. rid
  local a = redis.call('HGET', h, f)
  if not a then return 0 end
  redis.call('HDEL', h, f)
  redis.call('ZREM', z, rid)
  incr(h, 'r', -num(a))
  return 1
end
-- Hold `amount` under `rid` (merged with an earlier hold of the same reservation).
local function hold(h, z, rid, amount, deadline)
  incr(h, 'a' .. rid, amount)
  incr(h, 'r', amount)
  redis.call('ZADD', z, 'GT', str(deadline), rid)
end
-- The latest hold deadline, or `floor`.
local function latest(z, floor)
  local top = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
  if top[2] then return math.max(floor, tonumber(top[2])) end
  return floor
end
-- A bucket's deficit and refill time at `now`: refilled at its stored rate, then
-- rescaled to period `pm` (rounded up: never a gift). Missing bucket: full.
local function bucket_at(h, now, pm)
  local s = redis.call('HMGET', h, 'd', 'at', 'lim', 'pm')
  local d, at, lim, opm = num(s[1]), num(s[2]), num(s[3]), num(s[4])
  if now > at then
    if lim > 0 and d > 0 then
      local el = now - at
      if el >= cdiv(d, lim) then d = 0 else d = d - el * lim end
    end
    at = now
  end
  if opm > 0 and opm ~= pm and d > 0 then
    local q = idiv(d, opm)
    d = cap(q * pm + cdiv((d - q * opm) * pm, opm))
  end
  return d, at
end
-- When a bucket with deficit d refilling lim per ms is full again (and its holds gone).
local function bucket_until(z, d, lim, now)
  local full = now
  if d > 0 then
    if lim > 0 then full = now + cdiv(d, lim) else full = MAX end
  end
  return latest(z, full)
end
"#
    };
}

/// Admission of one request's counters (those in one slot, on a cluster): check every
/// op, and only if all pass, apply them all.
///
/// - `KEYS[2i-1]`, `KEYS[2i]`: op i's state hash and holds set.
/// - `ARGV[1]` now, `ARGV[2]` reservation id, `ARGV[3]` deadline, `ARGV[4]` settlement
///   grace, `ARGV[5]` number of ops n; then 10 per op from `ARGV[6 + 10(i-1)]`: type
///   (`f`/`b`/`c`), counter id, kind, need (`room`/`fits`), commit, reserve, limit (a
///   bucket's refill per period), earlier (units this request's earlier ops take from
///   the same counter), then for `f` window start and end, for `b` period and burst.
///
/// Returns `{admitted (1/0), holds purged, then per op: passed (1/0), value (for buckets
/// the deficit), reserved, soonest hold deadline (-1: none; only when refused)}`.
/// Snapshots are read before any of this request's charges. Releasing due holds,
/// refilling buckets and adopting a new period happen even when refused: that is what
/// any reader at `now` sees, not a change of accounting.
pub(crate) const ADMIT: &str = concat!(
    helpers!(),
    r#"
local now, rid, deadline = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local grace, n = tonumber(ARGV[4]), tonumber(ARGV[5])
local out = {1, 0}
local purged = 0
for i = 1, n do
  local h, z, a = KEYS[2 * i - 1], KEYS[2 * i], 5 + 10 * (i - 1)
  local ty, need = ARGV[a + 1], ARGV[a + 4]
  local commit, reserve = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local limit, earlier = tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8])
  local p, q = tonumber(ARGV[a + 9]), tonumber(ARGV[a + 10])
  local value, raw, reserved, ceiling = 0, 0, 0, limit
  if ty == 'f' then
    -- Holds exist only while `r` > 0 (every hold is positive), so the common case of a
    -- counter without holds costs one read.
    local s = redis.call('HMGET', h, 'v', 'r')
    value, reserved = num(s[1]), num(s[2])
    if reserved > 0 then
      local k = purge(h, z, now)
      if k > 0 then
        purged = purged + k
        reserved = num(redis.call('HGET', h, 'r'))
      end
    end
    raw = value
  elseif ty == 'b' then
    purged = purged + purge(h, z, now)
    local d, at = bucket_at(h, now, p)
    if redis.call('EXISTS', h) == 1 then
      redis.call('HSET', h, 'd', str(d), 'at', str(at), 'pm', str(p), 'lim', str(limit), 'bu', str(q))
      expire(h, z, bucket_until(z, d, limit, now) + grace)
    end
    reserved = num(redis.call('HGET', h, 'r'))
    value, raw, ceiling = cdiv(d, p), d, cap(limit + q)
  else
    purged = purged + purge(h, z, now)
    reserved = num(redis.call('HGET', h, 'r'))
  end
  local used = value + reserved + earlier
  local ok
  if need == 'room' then ok = used < ceiling else ok = used + commit + reserve <= ceiling end
  local soonest = -1
  if not ok then
    out[1] = 0
    local first = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
    if first[2] then soonest = tonumber(first[2]) end
  end
  table.insert(out, ok and 1 or 0)
  table.insert(out, raw)
  table.insert(out, reserved)
  table.insert(out, soonest)
end
out[2] = purged
if out[1] == 0 then return out end
for i = 1, n do
  local h, z, a = KEYS[2 * i - 1], KEYS[2 * i], 5 + 10 * (i - 1)
  local ty, id, kind = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local commit, reserve, limit = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
  local p, q = tonumber(ARGV[a + 9]), tonumber(ARGV[a + 10])
  local held = reserve
  if ty == 'c' then held = commit + reserve end
  if deadline <= now then held = 0 end
  if ty == 'f' then
    -- A pure check (after-mode tokens) writes nothing. `v` is absent exactly when the
    -- window's hash does not exist yet: only then does it need its expiry (always the
    -- window's end plus grace); the holds set gets it whenever a hold is added.
    if commit > 0 or held > 0 then
      local v = redis.call('HGET', h, 'v')
      redis.call('HSET', h, 'y', 'f', 'id', id, 'k', kind, 'lim', str(limit), 's', str(p), 'e', str(q), 'v', str(cap(num(v) + commit)))
      if held > 0 then
        hold(h, z, rid, held, deadline)
        redis.call('PEXPIREAT', z, str(cap(q + grace)))
      end
      if not v then redis.call('PEXPIREAT', h, str(cap(q + grace))) end
    end
  elseif ty == 'b' then
    local d, at = bucket_at(h, now, p)
    d = cap(d + commit * p)
    redis.call('HSET', h, 'y', 'b', 'id', id, 'k', kind, 'lim', str(limit), 'pm', str(p), 'bu', str(q), 'd', str(d), 'at', str(at))
    if held > 0 then hold(h, z, rid, held, deadline) end
    expire(h, z, bucket_until(z, d, limit, now) + grace)
  else
    redis.call('HSET', h, 'y', 'c', 'id', id, 'k', kind, 'lim', str(limit))
    if held > 0 then hold(h, z, rid, held, deadline) end
    expire(h, z, latest(z, now) + grace)
  end
end
return out
"#
);

/// Settlement of one request's counters (those in one slot, on a cluster): release the
/// reservation's hold if still there, and charge the real cost to the admission's
/// window — even if it ended, unless it is past its grace (then the charge is dropped).
///
/// - `KEYS` as in [`ADMIT`].
/// - `ARGV[1]` now, `ARGV[2]` grace, `ARGV[3]` number n; then 9 per settlement from
///   `ARGV[4 + 9(i-1)]`: type, reservation id, actual, counter id, kind, limit, then for
///   `f` window start and end, for `b` period and burst; then whether the admission may
///   have held units for this op (`1`/`0`: without a hold there is nothing to release).
///
/// Returns `{holds purged, then per settlement: released (1/0), dropped (1/0)}`.
/// A bucket is charged at its stored period (a missing one at the op's); a concurrency
/// counter spends nothing. Due holds of fixed windows are left to admission, inspection
/// and sweep (which release them anyway), so a settlement without a hold is one write.
pub(crate) const SETTLE: &str = concat!(
    helpers!(),
    r#"
local now, grace, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {0}
for i = 1, n do
  local h, z, a = KEYS[2 * i - 1], KEYS[2 * i], 3 + 9 * (i - 1)
  local ty, rid, actual = ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  local id, kind, limit = ARGV[a + 4], ARGV[a + 5], tonumber(ARGV[a + 6])
  local p, q, mayhold = tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8]), ARGV[a + 9] == '1'
  if ty ~= 'f' then out[1] = out[1] + purge(h, z, now) end
  local released, dropped = 0, 0
  if ty == 'f' and q + grace <= now then
    -- Past its grace by the engine's clock: gone, with any holds, whatever Redis' clock says.
    redis.call('DEL', h, z)
    if actual > 0 then dropped = 1 end
  else
    if mayhold then released = release(h, z, rid) end
    if ty == 'f' then
      if actual > 0 then
        -- `v` equal to `actual` afterwards: the hash may be new, so it gets its
        -- description and expiry (the window's end plus grace, as at admission).
        local v = incr(h, 'v', actual)
        if v == actual then
          redis.call('HSET', h, 'y', 'f', 'id', id, 'k', kind, 's', str(p), 'e', str(q))
          redis.call('HSETNX', h, 'lim', str(limit))
          redis.call('PEXPIREAT', h, str(cap(q + grace)))
        end
      end
    elseif ty == 'b' then
      if actual > 0 then
        local pm = num(redis.call('HGET', h, 'pm'))
        if pm == 0 then pm = p end
        local d, at = bucket_at(h, now, pm)
        d = cap(d + actual * pm)
        redis.call('HSET', h, 'y', 'b', 'id', id, 'k', kind, 'd', str(d), 'at', str(at), 'pm', str(pm))
        redis.call('HSETNX', h, 'lim', str(limit))
        redis.call('HSETNX', h, 'bu', str(q))
      end
      if redis.call('EXISTS', h) == 1 then
        local s = redis.call('HMGET', h, 'd', 'lim')
        expire(h, z, bucket_until(z, num(s[1]), num(s[2]), now) + grace)
      end
    elseif redis.call('EXISTS', h) == 1 then
      expire(h, z, latest(z, now) + grace)
    end
  end
  table.insert(out, released)
  table.insert(out, dropped)
end
return out
"#
);

/// A plain charge: settlement of fixed windows with no hold to release and within their
/// grace (after-mode tokens, request counts), the common case, without [`SETTLE`]'s
/// helpers and branches.
///
/// - `KEYS[i]`: counter i's state hash.
/// - 7 `ARGV` per counter from `ARGV[1 + 7(i-1)]`: actual (> 0), counter id, kind, limit,
///   window start, window end, expiry (window end plus grace).
///
/// Returns, per counter, its value after the charge and its reserved units: `{v1, r1,
/// v2, r2, …}` (what a batching replica's read cache learns from its own writes). `v`
/// saturates at 2^53 - 1; a new hash gets its description and expiry, as in [`SETTLE`].
pub(crate) const CHARGE: &str = r#"
local out = {}
for i = 1, #KEYS do
  local h, a = KEYS[i], 7 * (i - 1)
  local v = redis.call('HINCRBY', h, 'v', ARGV[a + 1])
  if v > 9007199254740991 then
    v = 9007199254740991
    redis.call('HSET', h, 'v', '9007199254740991')
  end
  if v == tonumber(ARGV[a + 1]) then
    redis.call('HSET', h, 'y', 'f', 'id', ARGV[a + 2], 'k', ARGV[a + 3], 's', ARGV[a + 5], 'e', ARGV[a + 6])
    redis.call('HSETNX', h, 'lim', ARGV[a + 4])
    redis.call('PEXPIREAT', h, ARGV[a + 7])
  end
  out[2 * i - 1] = v
  out[2 * i] = tonumber(redis.call('HGET', h, 'r')) or 0
end
return out
"#;

/// Compensation on a cluster: undo an admission this script's slot made while another
/// slot refused (or failed). Releases the reservation's hold and takes back the commits.
///
/// - `KEYS` as in [`ADMIT`].
/// - `ARGV[1]` reservation id, `ARGV[2]` number of ops n; then 2 per op from
///   `ARGV[3 + 2(i-1)]`: type, commit.
///
/// Returns 1. Idempotent for holds; commits are taken back once per call, so it is called
/// only for a slot whose admission reported success.
pub(crate) const ROLLBACK: &str = concat!(
    helpers!(),
    r#"
local rid, n = ARGV[1], tonumber(ARGV[2])
for i = 1, n do
  local h, z, a = KEYS[2 * i - 1], KEYS[2 * i], 2 + 2 * (i - 1)
  local ty, commit = ARGV[a + 1], tonumber(ARGV[a + 2])
  release(h, z, rid)
  if commit > 0 and redis.call('EXISTS', h) == 1 then
    if ty == 'f' then
      redis.call('HSET', h, 'v', str(cap(num(redis.call('HGET', h, 'v')) - commit)))
    elseif ty == 'b' then
      local s = redis.call('HMGET', h, 'd', 'pm')
      redis.call('HSET', h, 'd', str(cap(num(s[1]) - commit * num(s[2]))))
    end
  end
end
return 1
"#
);

/// Sweep of one counter-window: release due holds; a fixed window past its grace (by
/// `now`) is deleted with its holds.
///
/// - `KEYS[1]` state hash, `KEYS[2]` holds set; `ARGV[1]` now, `ARGV[2]` grace.
///
/// Returns `{holds released, windows reclaimed}`.
pub(crate) const SWEEP: &str = concat!(
    helpers!(),
    r#"
local h, z = KEYS[1], KEYS[2]
local now, grace = tonumber(ARGV[1]), tonumber(ARGV[2])
local s = redis.call('HMGET', h, 'y', 'e')
if not s[1] then
  local held = redis.call('ZCARD', z)
  redis.call('DEL', z)
  return {held, 0}
end
if s[1] == 'f' and num(s[2]) + grace <= now then
  local held = redis.call('ZCARD', z)
  redis.call('DEL', h, z)
  return {held, 1}
end
return {purge(h, z, now), 0}
"#
);

/// Inspection of one counter-window: release due holds, then read it.
///
/// - `KEYS[1]` state hash, `KEYS[2]` holds set; `ARGV[1]` now, `ARGV[2]` grace.
///
/// Returns the fields `y id k lim s e v r d at pm bu` (nil where absent), or an empty
/// array for a fixed window past its grace. Buckets are refilled by the caller.
pub(crate) const VIEW: &str = concat!(
    helpers!(),
    r#"
local h, z = KEYS[1], KEYS[2]
local now, grace = tonumber(ARGV[1]), tonumber(ARGV[2])
purge(h, z, now)
local s = redis.call('HMGET', h, 'y', 'id', 'k', 'lim', 's', 'e', 'v', 'r', 'd', 'at', 'pm', 'bu')
if not s[1] or (s[1] == 'f' and num(s[6]) + grace <= now) then return {} end
return s
"#
);

/// Reset of one counter-window, if it belongs to the counter (SCAN patterns are a
/// superset: another id may extend this one).
///
/// - `KEYS[1]` state hash, `KEYS[2]` holds set; `ARGV[1]` counter id.
///
/// Returns 1 if deleted, else 0.
pub(crate) const RESET: &str = r#"
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"#;
