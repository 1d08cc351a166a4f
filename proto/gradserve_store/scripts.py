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
# dispatch sets, and append the status event, all in one step. A new state
# also moves the job between its tenant's state zsets, which LIST reads.
#   KEYS: job hash, event stream, leases zset, dispatch zset, then the tenant's
#         zsets of jobs by state, one per JobState from QUEUED (1) on
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
if op.set.state then
  local before = tonumber(redis.call('HGET', KEYS[1], 'state'))
  redis.call('ZREM', KEYS[4 + before], op.job)
  redis.call('ZADD', KEYS[4 + tonumber(op.set.state)], redis.call('HGET', KEYS[1], 'created'), op.job)
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
# numbers that ListJobs sorts by, each in its own zset of the tenant's jobs.
#   KEYS: job hash, event stream, then the tenant's sort zsets
#   ARGV: attempt, token, RUNNING, kind, step ("" when the event has none), event bytes, summary bytes,
#         job id, then the job's value in each sort zset ("" for none yet)
#   Returns {1, entry id} appended, {2} skipped, {0, state, attempt} fenced off.
APPEND = FENCE + """
if ARGV[5] ~= '' then
  local seen = ARGV[4] == 'metrics' and 'last_step' or ('seen:' .. ARGV[4])
  if tonumber(ARGV[5]) <= tonumber(redis.call('HGET', KEYS[1], seen) or '-1') then return {2} end
  redis.call('HSET', KEYS[1], seen, ARGV[5])
end
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'summary', ARGV[7])
  for i = 3, #KEYS do
    if ARGV[6 + i] ~= '' then redis.call('ZADD', KEYS[i], ARGV[6 + i], ARGV[8]) end
  end
end
return {1, redis.call('XADD', KEYS[2], '*', 'e', ARGV[6])}
"""

# The latest and best checkpoints. A best checkpoint saved by the same save
# as the latest one holds no bytes of its own, only 'shared' = 1: its bytes are
# the latest's until a newer latest replaces them, which first gives the best
# hash its own copy. So a checkpoint that is both is stored once.
#   KEYS (all three scripts): job hash, event stream, latest checkpoint hash, best checkpoint hash
KEEP_SHARED_BEST = """
local function keep_shared_best()
  if redis.call('HGET', KEYS[4], 'shared') == '1' then
    redis.call('HSET', KEYS[4], 'data', redis.call('HGET', KEYS[3], 'data'))
    redis.call('HDEL', KEYS[4], 'shared')
  end
end
local function put_latest(step, data)
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[3], 'data', data, 'step', step)
  redis.call('HSET', KEYS[1], 'checkpoint_step', step)
end
local function put_best(step, loss, fields)
  redis.call('DEL', KEYS[4])
  redis.call('HSET', KEYS[4], 'step', step, 'loss', loss, unpack(fields))
  redis.call('HSET', KEYS[1], 'best_checkpoint_step', step)
end
local function newer_latest(step)
  return tonumber(step) > tonumber(redis.call('HGET', KEYS[1], 'checkpoint_step') or '-1')
end
local function better_best(loss)
  local stored = redis.call('HGET', KEYS[4], 'loss')
  return not stored or tonumber(loss) < tonumber(stored)
end
"""

# The job's checkpoint, replaced whole with its event (a script runs alone, so
# a reader gets the old checkpoint or the new one, never a mix). A step no
# later than the stored one is skipped: only the newest checkpoint is kept.
#   ARGV: attempt, token, RUNNING, step, data, event bytes. Returns as APPEND.
CHECKPOINT = FENCE + KEEP_SHARED_BEST + """
if not newer_latest(ARGV[4]) then return {2} end
keep_shared_best()
put_latest(ARGV[4], ARGV[5])
return {1, redis.call('XADD', KEYS[2], '*', 'e', ARGV[6])}
"""

# The checkpoint of the best evaluation so far, kept beside the latest: it
# replaces the stored one only when its held-out loss is lower.
#   ARGV: attempt, token, RUNNING, step, data, event bytes, the evaluation's loss. Returns as APPEND.
BEST_CHECKPOINT = FENCE + KEEP_SHARED_BEST + """
if not better_best(ARGV[7]) then return {2} end
put_best(ARGV[4], ARGV[7], {'data', ARGV[5]})
return {1, redis.call('XADD', KEYS[2], '*', 'e', ARGV[6])}
"""

# One save that is both the latest checkpoint and the best so far, with one
# event. Each part is skipped as the scripts above skip it (a resumed attempt
# saving a step again), and the event says what was kept.
#   ARGV: attempt, token, RUNNING, step, data, the evaluation's loss, then the event bytes for both, for the
#         latest alone and for the best alone. Returns as APPEND.
LATEST_AND_BEST_CHECKPOINT = FENCE + KEEP_SHARED_BEST + """
local latest, best = newer_latest(ARGV[4]), better_best(ARGV[6])
-- A best about to be replaced needs no copy of the bytes it shared.
if latest and not best then keep_shared_best() end
if latest then put_latest(ARGV[4], ARGV[5]) end
if best then put_best(ARGV[4], ARGV[6], latest and {'shared', 1} or {'data', ARGV[5]}) end
if latest and best then return {1, redis.call('XADD', KEYS[2], '*', 'e', ARGV[7])} end
if latest then return {1, redis.call('XADD', KEYS[2], '*', 'e', ARGV[8])} end
if best then return {1, redis.call('XADD', KEYS[2], '*', 'e', ARGV[9])} end
return {2}
"""

# The step and bytes of the latest checkpoint, of the best one (whose bytes
# may be the latest's), or of whichever of them is at a given step; nil when
# there is none. A script, so that a shared best is read before a newer latest
# replaces its bytes, and so that only the bytes asked for leave Redis.
#   KEYS: latest checkpoint hash, best checkpoint hash.  ARGV: "latest", "best" or a step
CHECKPOINT_OF = """
local function read(key)
  local step, data, shared = unpack(redis.call('HMGET', key, 'step', 'data', 'shared'))
  if shared == '1' then data = redis.call('HGET', KEYS[1], 'data') end
  if data then return {step, data} end
  return false
end
if ARGV[1] == 'latest' then return read(KEYS[1]) end
if ARGV[1] == 'best' then return read(KEYS[2]) end
for _, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'step') == ARGV[1] then
    local found = read(key)
    if found then return found end
  end
end
return false
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


# Remove an ended job whole: its record, events, checkpoints and log, and its place
# in its tenant's list and in every index; a job still QUEUED or RUNNING is
# left as it is.
#   KEYS: job hash, event stream, latest, best and initial checkpoint hashes, log stream, tenant's jobs zset,
#         tenant's active set, leases, dispatch,
#         names hash, the tenant's names zset, then every other zset of the tenant's that may hold the job
#         (by state, model, dataset, tag, sort order)
#   ARGV: job id, then the states it may be deleted in
#   Returns {1} deleted, {0, state} refused, {-1} no such job.
DELETE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1} end
local deletable = false
for i = 2, #ARGV do if state == ARGV[i] then deletable = true end end
if not deletable then return {0, tonumber(state)} end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('ZREM', KEYS[7], ARGV[1])
redis.call('SREM', KEYS[8], ARGV[1])
redis.call('ZREM', KEYS[9], ARGV[1])
redis.call('ZREM', KEYS[10], ARGV[1])
local name = redis.call('HGET', KEYS[11], ARGV[1])
if name and name ~= '' then redis.call('ZREM', KEYS[12], name .. string.char(0) .. ARGV[1]) end
redis.call('HDEL', KEYS[11], ARGV[1])
for i = 13, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return {1}
"""


# One page of a tenant's jobs that match a filter, found inside Redis so that
# only the page crosses the network. Each filter but the name is a zset of
# the tenant's jobs, scored by creation time: by state (kept by CAS), by
# model, dataset and each tag (written at submission). In creation order the
# smallest of them is walked, a slice at a time, and each slice is checked
# against the others with one ZMSCORE each (the name with one HMGET), until
# the page is full: a selective filter costs its own few jobs. By a metric,
# the tenant's zset of that metric (kept by APPEND) is walked instead, then
# the jobs without it yet, newest first.
# A name that no small zset filter narrows is first checked that way too, for
# a few thousand jobs; a name that has not filled the page by then is rare,
# and a ZSCAN with MATCH over the tenant's named jobs (members "casefolded
# name NUL id") finds its jobs in C. Fewer than the smallest filter's, they
# drive the page, sorted here: a rare name costs one pass over the names in
# Redis rather than a read of each.
#   KEYS: the tenant's jobs zset, the names hash (job id -> casefolded name), the tenant's names zset, the zset
#         of the metric ordered by (the jobs zset again for creation order), then one zset per filter
#   ARGV: the query as JSON {name (casefolded), after, before (creation times; absent: no bound), by_metric (bool),
#         desc (bool: highest or newest first), limit, token: where the previous page ended,
#         {rank (0: had the metric, 1: had none), score, id}, or absent}; with a name, the MATCH pattern for it
#   Returns the page's ids, then the next page's token as rank, score and id; all "" on the last page.
LIST = """
local q = cjson.decode(ARGV[1])
-- With each id on the page, where it was found: the walk's rank (0: by the metric, 1: without it) and zset.
local page, found_at, rank = {}, {}, 0
local lo_created, hi_created = tonumber(q.after or '-inf'), tonumber(q.before or 'inf')

-- The filter zsets by size: the smallest drives a walk in creation order, the rest check each slice.
local filters = {}
for i = 5, #KEYS do filters[#filters + 1] = {KEYS[i], redis.call('ZCARD', KEYS[i])} end
table.sort(filters, function(a, b) return a[2] < b[2] end)

-- The name filter, checked one of two ways. While `named` is nil, each slice's names are read from the names
-- hash (KEYS[2]) and searched; `budget`, when set, is how many more jobs a walk may check that way before it
-- gives up (gave_up). scan_names() fills `named` (id -> creation time as Redis wrote it) and name_rows
-- ({id, creation time}) with the jobs whose names match, from the names zset (KEYS[3]).
local named, name_rows, budget, gave_up = nil, {}, nil, false
local function scan_names()
  named = {}
  local cursor, nul = '0', string.char(0)
  repeat
    local got = redis.call('ZSCAN', KEYS[3], cursor, 'MATCH', ARGV[2], 'COUNT', 1000)
    cursor = got[1]
    for i = 1, #got[2], 2 do
      local member = got[2][i]
      local id = string.sub(member, string.find(member, nul, 1, true) + 1)
      -- A SCAN may return a member twice.
      if not named[id] then
        named[id] = got[2][i + 1]
        name_rows[#name_rows + 1] = {id, tonumber(got[2][i + 1])}
      end
    end
  until cursor == '0'
end

local function keep(ids, skip_key, check_created)
  local ok = {}
  for i = 1, #ids do ok[i] = true end
  for _, f in ipairs(filters) do
    if f[1] ~= skip_key then
      local scores = redis.call('ZMSCORE', f[1], unpack(ids))
      for i = 1, #ids do ok[i] = ok[i] and scores[i] ~= false end
    end
  end
  if check_created then
    local created = redis.call('ZMSCORE', KEYS[1], unpack(ids))
    for i = 1, #ids do
      local t = tonumber(created[i] or '')
      ok[i] = ok[i] and t ~= nil and t >= lo_created and t < hi_created
    end
  end
  if named then
    for i = 1, #ids do ok[i] = ok[i] and named[ids[i]] ~= nil end
  elseif q.name then
    local names = redis.call('HMGET', KEYS[2], unpack(ids))
    for i = 1, #ids do ok[i] = ok[i] and string.find(names[i] or '', q.name, 1, true) ~= nil end
  end
  local out = {}
  for i, id in ipairs(ids) do if ok[i] then out[#out + 1] = id end end
  return out
end

-- Walk zset `key` between scores lo and hi, from hi down when desc, starting after the token (equal scores
-- come in member order, the same way round); `drop`, if given, removes ids from each slice before the
-- filters. Adds matches to the page; returns true once one more than the page was found. Members are read
-- without their scores, which cost more to send than the members: only the page's last one needs its own.
local function walk(key, desc, lo, hi, token, check_created, drop)
  local function take(ids)
    if drop then ids = drop(ids) end
    if #ids == 0 then return false end
    if budget then budget = budget - #ids end
    for _, id in ipairs(keep(ids, key, check_created)) do
      if #page == q.limit then return true end
      page[#page + 1] = id
      found_at[#page] = {rank, key}
    end
    return false
  end
  if token then
    -- First the members at the token's own score that come after it, then those past that score.
    local tied, after = redis.call('ZRANGEBYSCORE', key, token.score, token.score), {}
    for i = 1, #tied do
      local id = desc and tied[#tied + 1 - i] or tied[i]
      if (desc and id < token.id) or (not desc and id > token.id) then after[#after + 1] = id end
    end
    if #after > 0 and take(after) then return true end
    if desc then hi = '(' .. token.score else lo = '(' .. token.score end
  end
  local offset, slice = 0, 256
  while true do
    local got
    if desc then
      got = redis.call('ZREVRANGEBYSCORE', key, hi, lo, 'LIMIT', offset, slice)
    else
      got = redis.call('ZRANGEBYSCORE', key, lo, hi, 'LIMIT', offset, slice)
    end
    if #got > 0 and take(got) then return true end
    if #got < slice then return false end
    if budget and budget <= 0 then
      gave_up = true
      return false
    end
    offset = offset + slice
  end
end

local lo = q.after or '-inf'
local hi = q.before and ('(' .. q.before) or '+inf'
local driver = filters[1] and filters[1][1] or KEYS[1]
local token = q.token
local more, last_rank, last_score = false, nil, nil

-- By a metric, with a filter much smaller than the metric's zset: `ids`, its jobs in the creation range
-- (`skip_key` the zset they came from, which need not be checked), with their values, sorted here in the order
-- the walks below would give, rather than walking the whole metric zset.
-- A sort key is {rank, value or creation time, id}; jobs without the metric come after, newest first.
local function sorted_by_metric(ids, skip_key)
  if #ids == 0 then return false end
  local values, created, rows = {}, {}, {}
  for start = 1, #ids, 256 do
    local chunk = {unpack(ids, start, math.min(#ids, start + 255))}
    local v = redis.call('ZMSCORE', KEYS[4], unpack(chunk))
    local c = redis.call('ZMSCORE', KEYS[1], unpack(chunk))
    for i, id in ipairs(keep(chunk, skip_key, false)) do rows[#rows + 1] = id end
    for i, id in ipairs(chunk) do values[id], created[id] = v[i], c[i] end
  end
  local function key(id)
    if values[id] then return {0, tonumber(values[id]), id, values[id]} end
    return {1, tonumber(created[id]), id, created[id]}
  end
  local function before(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    local down = a[1] == 1 or q.desc  -- rank 1 is newest first; rank 0 follows the order asked for
    if a[2] ~= b[2] then if down then return a[2] > b[2] else return a[2] < b[2] end end
    if down then return a[3] > b[3] else return a[3] < b[3] end
  end
  local keyed = {}
  for i, id in ipairs(rows) do keyed[i] = key(id) end
  table.sort(keyed, before)
  local start = 1
  if token then
    local at = {token.rank, tonumber(token.score), token.id}
    while start <= #keyed and not before(at, keyed[start]) do start = start + 1 end
  end
  for i = start, #keyed do
    if #page == q.limit then
      local k = keyed[i - 1]
      last_rank, last_score = k[1], k[4]
      return true
    end
    page[#page + 1] = keyed[i][3]
  end
  return false
end

-- In creation order, the jobs the name matched, within the creation range and after the token, checked
-- against the other filters a slice at a time; the same order and token as a walk.
local function walk_named()
  local function before(a, b)
    if a[2] ~= b[2] then if q.desc then return a[2] > b[2] else return a[2] < b[2] end end
    if q.desc then return a[1] > b[1] else return a[1] < b[1] end
  end
  table.sort(name_rows, before)
  local at = token and {token.id, tonumber(token.score)}
  local ids = {}
  for _, r in ipairs(name_rows) do
    if r[2] >= lo_created and r[2] < hi_created and (not at or before(at, r)) then ids[#ids + 1] = r[1] end
  end
  for start = 1, #ids, 256 do
    for _, id in ipairs(keep({unpack(ids, start, math.min(#ids, start + 255))}, nil, false)) do
      if #page == q.limit then
        last_rank, last_score = 0, named[page[#page]]
        return true
      end
      page[#page + 1] = id
    end
  end
  return false
end

-- One page by the filters' zsets and the metric, as described above; with the name checked as `named` says.
local function by_zsets()
  local small = filters[1] and filters[1][2] <= 4096
  if not q.by_metric then
    return walk(driver, q.desc, lo, hi, token, false)
  elseif small and filters[1][2] * 4 < redis.call('ZCARD', KEYS[4]) then
    return sorted_by_metric(redis.call('ZREVRANGEBYSCORE', driver, hi, lo), driver)
  end
  local found = false
  if not token or token.rank == 0 then
    found = walk(KEYS[4], q.desc, '-inf', '+inf', token, q.after or q.before)
    token = nil
  end
  if found or gave_up then return found end
  rank = 1
  local function without_metric(ids)
    local values = redis.call('ZMSCORE', KEYS[4], unpack(ids))
    local out = {}
    for i, id in ipairs(ids) do if not values[i] then out[#out + 1] = id end end
    return out
  end
  return walk(driver, true, lo, hi, token, false, without_metric)
end

if not q.name or (filters[1] and filters[1][2] <= 4096) then
  -- No name, or a zset filter small enough to check the name of each of its jobs.
  more = by_zsets()
else
  -- A common name fills the page from the first jobs walked. When a few thousand have not, it is rare: the
  -- walk is dropped, Redis finds the jobs it matches, and they drive the page if they are the fewest.
  budget = 2048
  more = by_zsets()
  if gave_up then
    page, found_at, rank, token, budget, gave_up = {}, {}, 0, q.token, nil, false
    scan_names()
    local ids = {}
    for _, r in ipairs(name_rows) do
      if r[2] >= lo_created and r[2] < hi_created then ids[#ids + 1] = r[1] end
    end
    if #ids >= (filters[1] and filters[1][2] or redis.call('ZCARD', KEYS[1])) then
      more = by_zsets()
    elseif not q.by_metric then
      more = walk_named()
    elseif #ids <= 4096 and #ids * 4 < redis.call('ZCARD', KEYS[4]) then
      more = sorted_by_metric(ids, nil)
    else
      more = by_zsets()
    end
  end
end
if more then
  local last = page[#page]
  if last_rank == nil then
    local at = found_at[#page]
    last_rank, last_score = at[1], redis.call('ZSCORE', at[2], last)
  end
  page[#page + 1] = tostring(last_rank)
  page[#page + 1] = last_score
  page[#page + 1] = last
else
  page[#page + 1] = ''
  page[#page + 1] = ''
  page[#page + 1] = ''
end
return page
"""


# A dataset's text is stored once, however many tenants upload it, and goes
# when the last of them deletes it: its hash counts the tenants that hold it
# (holders). Each step is one script, so an upload and a delete of the same
# text cannot cross. A dataset stored before the count existed has none, and
# its text is kept.
#   KEYS: dataset hash, the tenant's datasets set.  ARGV: dataset id
#   Returns 1 when the text is there (now held by the tenant), 0 when it must be stored (STORE_DATASET).
HOLD_DATASET = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 and redis.call('HEXISTS', KEYS[1], 'holders') == 1 then
  redis.call('HINCRBY', KEYS[1], 'holders', 1)
end
return 1
"""

# Stores the text unless it is there already, then holds it as HOLD_DATASET does.
#   KEYS: as HOLD_DATASET.  ARGV: dataset id, data, then field, value pairs (name, size, counts...)
STORE_DATASET = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'data', ARGV[2], 'holders', 0)
  for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 and redis.call('HEXISTS', KEYS[1], 'holders') == 1 then
  redis.call('HINCRBY', KEYS[1], 'holders', 1)
end
return 1
"""

# The tenant lets go of a dataset; the text goes with its last holder.
#   KEYS: as HOLD_DATASET.  ARGV: dataset id.  Returns 2 when the text went, 1 when it stays.
RELEASE_DATASET = """
if redis.call('SREM', KEYS[2], ARGV[1]) == 1 and redis.call('HEXISTS', KEYS[1], 'holders') == 1 then
  if redis.call('HINCRBY', KEYS[1], 'holders', -1) <= 0 then
    redis.call('DEL', KEYS[1])
    return 2
  end
end
return 1
"""
