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
# leaves it as it was), stored only with the event, and the summary's
# numbers that ListJobs sorts by, as plain fields LIST can read.
#   KEYS: job hash, event stream
#   ARGV: attempt, token, RUNNING, kind, step ("" when the event has none), event bytes, summary bytes,
#         then pairs of sort field and its value ("" for none yet)
#   Returns {1, entry id} appended, {2} skipped, {0, state, attempt} fenced off.
APPEND = FENCE + """
if ARGV[5] ~= '' then
  local seen = ARGV[4] == 'metrics' and 'last_step' or ('seen:' .. ARGV[4])
  if tonumber(ARGV[5]) <= tonumber(redis.call('HGET', KEYS[1], seen) or '-1') then return {2} end
  redis.call('HSET', KEYS[1], seen, ARGV[5])
end
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'summary', ARGV[7])
  for i = 8, #ARGV, 2 do
    if ARGV[i + 1] ~= '' then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  end
end
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


# One page of a tenant's jobs that match a filter, read inside Redis so that
# only the page crosses the network. The filter's fields are plain fields of
# each job's hash, written at submission (model, dataset, name_key, tags as
# "\nkey=value\n" lines) or kept by APPEND (the sort fields).
#   KEYS: the tenant's jobs zset (scored by creation time)
#   ARGV: the job hash key prefix, then the query as JSON {state, model, dataset, name, tags: ["\nk=v\n", ...],
#         after, before (creation times, or absent), sort ("" for creation time, else a sort field),
#         desc (bool: highest or newest first), limit, token: the previous page's last job as
#         {score, id} in creation order or {rank, score, id} by a metric, or absent}
#   Returns {ids..., next token's score, next token's id}: the last two are "" on the last page.
# In creation order it reads the zset a slice at a time and stops at a full
# page; by a metric it must read every job in the creation range and sort.
LIST = """
local q = cjson.decode(ARGV[2])
local prefix = ARGV[1]
local function matches(id)
  local h = redis.call('HMGET', prefix .. id, 'state', 'model', 'dataset', 'name_key', 'tags')
  if not h[1] then return false end
  if q.state and h[1] ~= q.state then return false end
  if q.model and h[2] ~= q.model then return false end
  if q.dataset and h[3] ~= q.dataset then return false end
  if q.name and not string.find(h[4] or '', q.name, 1, true) then return false end
  for _, tag in ipairs(q.tags) do
    if not string.find(h[5] or '', tag, 1, true) then return false end
  end
  return true
end
local hi = q.before and ('(' .. q.before) or '+inf'
local lo = q.after or '-inf'
local page = {}
if q.sort == '' then
  -- Newest first unless q.desc is false; equal scores come in id order the same way round,
  -- so the ones up to the token's were on earlier pages.
  local token, newest = q.token, q.desc
  if token then
    if newest then hi = token.score else lo = token.score end
  end
  local offset, slice = 0, 512
  while true do
    local got
    if newest then
      got = redis.call('ZREVRANGEBYSCORE', KEYS[1], hi, lo, 'WITHSCORES', 'LIMIT', offset, slice)
    else
      got = redis.call('ZRANGEBYSCORE', KEYS[1], lo, hi, 'WITHSCORES', 'LIMIT', offset, slice)
    end
    for i = 1, #got, 2 do
      local id, score = got[i], got[i + 1]
      local seen = token and tonumber(score) == tonumber(token.score)
        and ((newest and id >= token.id) or (not newest and id <= token.id))
      if not seen and matches(id) then
        if #page == q.limit then
          local last = page[#page]
          page[#page + 1] = redis.call('ZSCORE', KEYS[1], last)
          page[#page + 1] = last
          return page
        end
        page[#page + 1] = id
      end
    end
    if #got < 2 * slice then break end
    offset = offset + slice
  end
  page[#page + 1] = ''
  page[#page + 1] = ''
  return page
end
-- By a metric: every matching job with its value, sorted; jobs without one last, newest first among them.
local rows = {}
local ids = redis.call('ZREVRANGEBYSCORE', KEYS[1], hi, lo, 'WITHSCORES')
for i = 1, #ids, 2 do
  local id = ids[i]
  if matches(id) then
    local v = redis.call('HGET', prefix .. id, q.sort)
    local value = tonumber(v or '')
    -- rank 0: has the metric, ordered by it; rank 1: has none, in creation order (newest first).
    if value == nil or value ~= value then
      rows[#rows + 1] = {1, -tonumber(ids[i + 1]), id}
    else
      rows[#rows + 1] = {0, q.desc and -value or value, id}
    end
  end
end
local function before(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  if a[2] ~= b[2] then return a[2] < b[2] end
  return a[3] < b[3]
end
table.sort(rows, before)
local start = 1
if q.token then
  local key = {tonumber(q.token.rank), tonumber(q.token.score), q.token.id}
  while start <= #rows and not before(key, rows[start]) do start = start + 1 end
end
for i = start, math.min(#rows, start + q.limit - 1) do page[#page + 1] = rows[i][3] end
if start + q.limit - 1 < #rows then
  local last = rows[start + q.limit - 1]
  page[#page + 1] = last[1] .. ':' .. string.format('%.17g', last[2])
  page[#page + 1] = last[3]
else
  page[#page + 1] = ''
  page[#page + 1] = ''
end
return page
"""
