"""The job store's Lua scripts: each runs in Redis as one step, so no other client sees it half done.

Only `store` loads them; their keys and arguments are documented above each.
"""

# Attempts are how the runs of one job stay apart. Each run is an attempt,
# numbered from 1; the worker that claims one draws a random token, and every
# write it makes afterwards (events, checkpoints, the job's end) names both and
# lands only while the job is still RUNNING that attempt under that token. A
# worker presumed dead, or one whose job went to a later attempt, is fenced off
# and stops, so two trainers never both write one job. Lease deadlines and
# dispatch times are on Redis's clock, the one clock every process shares.

NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# A compare-and-set on the job record. When every field in op.expect has the
# value given ('' for absent) and, with op.lease_expired, the job's lease has
# run out: set fields, put the job in or take it out of the lease and
# dispatch sets, and append the status event, all in one step.
#   KEYS: job hash, event stream, leases zset, dispatch zset
#   ARGV: op as JSON {job, expect, lease_expired, set, lease: set|del|"", lease_ms,
#         dispatch: add|del|"", dispatch_ms}, event bytes ("" for none)
#   Returns {1, entry id or ""} when applied, {0, field, its value} when a field
#   is not as expected, {-1} when there is no job.
CAS = NOW_MS + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local op = cjson.decode(ARGV[1])
for field, want in pairs(op.expect) do
  local have = redis.call('HGET', KEYS[1], field) or ''
  if have ~= want then return {0, field, have} end
end
if op.lease_expired then
  local deadline = redis.call('ZSCORE', KEYS[3], op.job)
  if deadline and tonumber(deadline) > now then return {0, 'lease', deadline} end
end
for field, value in pairs(op.set) do redis.call('HSET', KEYS[1], field, value) end
if op.lease == 'set' then redis.call('ZADD', KEYS[3], now + op.lease_ms, op.job)
elseif op.lease == 'del' then redis.call('ZREM', KEYS[3], op.job) end
if op.dispatch == 'add' then redis.call('ZADD', KEYS[4], now + op.dispatch_ms, op.job)
elseif op.dispatch == 'del' then redis.call('ZREM', KEYS[4], op.job) end
if ARGV[2] == '' then return {1, ''} end
return {1, redis.call('XADD', KEYS[2], '*', 'e', ARGV[2])}
"""

# The fence in front of every write of a running attempt.
#   ARGV[1..3]: attempt, token, the RUNNING state. Fenced off: {0, state, attempt}.
FENCE = """
local attempt, owner, state = unpack(redis.call('HMGET', KEYS[1], 'attempt', 'owner', 'state'))
if attempt ~= ARGV[1] or owner ~= ARGV[2] or state ~= ARGV[3] then
  return {0, state or '', attempt or ''}
end
"""

# A worker's event, at most once per step and kind: a step the stream already
# has an event of this kind for (a write retried after a lost reply, or a
# resumed attempt recomputing steps its predecessor reported) is skipped, so a
# watcher never sees a step twice or going back. With the event comes the
# job's summary as it stands after it (JobSummary bytes, "" when the event
# leaves it as it was), stored only with the event.
#   KEYS: job hash, event stream
#   ARGV: attempt, token, RUNNING, kind, step ("" when the event has none), event bytes, summary bytes
#   Returns {1, entry id} appended, {2} skipped, {0, state, attempt} fenced off.
APPEND = FENCE + """
if ARGV[5] ~= '' then
  local seen = ARGV[4] == 'metrics' and 'last_step' or ('seen:' .. ARGV[4])
  if tonumber(ARGV[5]) <= tonumber(redis.call('HGET', KEYS[1], seen) or '-1') then return {2} end
  redis.call('HSET', KEYS[1], seen, ARGV[5])
end
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'summary', ARGV[7]) end
return {1, redis.call('XADD', KEYS[2], '*', 'e', ARGV[6])}
"""

# The job's checkpoint, replaced whole with its event (a script runs alone, so
# a reader gets the old checkpoint or the new one, never a mix). A step no
# later than the stored one is skipped: only the newest checkpoint is kept.
#   KEYS: job hash, event stream, checkpoint hash
#   ARGV: attempt, token, RUNNING, step, data, event bytes. Returns as APPEND.
CHECKPOINT = FENCE + """
if tonumber(ARGV[4]) <= tonumber(redis.call('HGET', KEYS[1], 'checkpoint_step') or '-1') then return {2} end
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'data', ARGV[5], 'step', ARGV[4])
redis.call('HSET', KEYS[1], 'checkpoint_step', ARGV[4])
return {1, redis.call('XADD', KEYS[2], '*', 'e', ARGV[6])}
"""

# Takes a due entry of the dispatch outbox for one caller, for the next
# retry_ms: returns {attempt, queue} to send, or nil when the entry is not due
# (another server took it) or the job is no longer QUEUED (the entry goes).
#   KEYS: dispatch zset, job hash.  ARGV: job id, retry_ms, the QUEUED state
TAKE_DISPATCH = NOW_MS + """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) > now then return false end
local state, attempt, queue = unpack(redis.call('HMGET', KEYS[2], 'state', 'attempt', 'queue'))
if state ~= ARGV[3] then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return false
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return {attempt, queue}
"""

# The task of this attempt was sent: its outbox entry goes, unless the job has
# been queued again as a later attempt, whose task is still to send.
#   KEYS: dispatch zset, job hash.  ARGV: job id, attempt
DISPATCHED = """
local attempt = redis.call('HGET', KEYS[2], 'attempt')
if not attempt or attempt == ARGV[2] then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 1
"""


# Remove an ended job whole: its record, events and checkpoint, and its place
# in its tenant's list; a job still QUEUED or RUNNING is left as it is.
#   KEYS: job hash, event stream, checkpoint hash, tenant's jobs zset, tenant's active set, leases, dispatch
#   ARGV: job id, then the states it may be deleted in
#   Returns {1} deleted, {0, state} refused, {-1} no such job.
DELETE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1} end
local deletable = false
for i = 2, #ARGV do if state == ARGV[i] then deletable = true end end
if not deletable then return {0, tonumber(state)} end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[1])
return {1}
"""
