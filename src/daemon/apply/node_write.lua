-- The daemon's writes to many hash slots of one Redis Cluster master in one script: each
-- slot's part of a batch with that slot's checkpoint (the cluster apply's fast path). A
-- script runs whole on its node, so each slot's part lands whole, as with the guarded
-- transaction of one slot (WATCH, check, MULTI ... EXEC), for a fraction of the commands.
-- It declares no keys: a script without a shebang may touch keys of several slots as long
-- as they are all on its node, and Redis refuses any other (non-local, or absent from a
-- slot being migrated away), which the script uses to leave such a slot out.
--   ARGV[1]  owner token
--   ARGV[2..7]  the checkpoint fields a position move sets, for 'h' slots: updated_ms,
--            its value, lsn, the position, applied, the position in hex
--   then per slot, a kind and (but for 'g' and 'h') its checkpoint, epoch and expected
--   position ('-': none yet):
--   'w' (writes): key count, the keys (every key and lease the part touches), command
--       count, and per command its argument count and arguments (the last ones set the
--       checkpoint's fields);
--   'f' (backfilled rows only): pair count and the key/value pairs, then count and the
--       key/value/PX-milliseconds triples of rows with a TTL, then command count and
--       commands as for 'w' (the checkpoint's);
--   'g' (backfilled rows only, unchecked): as 'f' without the checkpoint, epoch and
--       expected position;
--   'h' (backfilled rows only, unchecked): the checkpoint whose position moves ('' for
--       none), then the pairs and triples as for 'f'; the move is ARGV[2..7] (an HSET).
-- First pass, nothing written: each 'w' slot's keys must all be here, else the slot is
-- left out (sent again on its own by the daemon, which follows the redirection), and its
-- checkpoint is checked as check.lua does; a refusal writes nothing. Of the 'f' slots,
-- only the first whose checkpoint is here is checked (if no slot was checked before it):
-- backfilled rows are fenced per master (see node_write.rs), since a daemon takes every
-- slot over (one script per master) before it writes anything. With no slot checked,
-- the 'f', 'g' and 'h' slots are left out.
-- Second pass: the commands of every slot not left out. A row of an 'f', 'g' or 'h' slot that
-- is not here (its slot is being migrated away) leaves that slot out, its checkpoint
-- unmoved: the daemon sends it again whole, which is safe for backfilled rows (the same
-- values). Every slot written whole moves its position, backfilled rows too, so that a
-- replica promoted without them is seen behind what the daemon recorded.
-- Returns {'ok', index of each slot left out...}, {'epoch'|'owner'|'moved', found, index},
-- or {'unwritten', Redis's error} when Redis refused the first write (nothing written).
local token = ARGV[1]
local slots = {}
local i = 8
local n = #ARGV
while i <= n do
  local s = {kind = ARGV[i]}
  if s.kind == 'g' then
    i = i + 1
  elseif s.kind == 'h' then
    s.ck = ARGV[i + 1]
    i = i + 2
  else
    s.ck, s.epoch, s.expected = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    i = i + 4
  end
  if s.kind == 'w' then
    s.nkeys = tonumber(ARGV[i])
    s.keys = i + 1
    i = s.keys + s.nkeys
  else
    s.npairs = tonumber(ARGV[i])
    s.pairs = i + 1
    i = s.pairs + 2 * s.npairs
    s.nttl = tonumber(ARGV[i])
    s.ttl = i + 1
    i = s.ttl + 3 * s.nttl
  end
  if s.kind == 'h' then
    s.ncmds = 0
  else
    s.ncmds = tonumber(ARGV[i])
    s.cmds = i + 1
    i = s.cmds
    for _ = 1, s.ncmds do i = i + 1 + tonumber(ARGV[i]) end
  end
  slots[#slots + 1] = s
end

local reply = {'ok'}
local left_out = {}
local fenced
for x, s in ipairs(slots) do
  local found
  if s.kind == 'w' then
    local k = s.keys
    local last = s.keys + s.nkeys - 1
    local upto = math.min(k + 499, last)
    local here = redis.pcall('EXISTS', s.ck, unpack(ARGV, k, upto))
    k = upto + 1
    while type(here) ~= 'table' and k <= last do
      upto = math.min(k + 499, last)
      here = redis.pcall('EXISTS', unpack(ARGV, k, upto))
      k = upto + 1
    end
    if type(here) ~= 'table' then found = redis.call('HMGET', s.ck, 'epoch', 'owner', 'lsn') end
  elseif s.kind == 'g' or s.kind == 'h' then
    found = false
  elseif not fenced then
    found = redis.pcall('HMGET', s.ck, 'epoch', 'owner', 'lsn')
    if found.err then found = nil end
  else
    found = false
  end
  if found == nil then
    left_out[x] = true
    reply[#reply + 1] = x
  elseif found then
    fenced = true
    local refused
    if found[1] ~= s.epoch then refused = {'epoch', found[1] or ''}
    elseif found[2] ~= token then refused = {'owner', found[2] or ''}
    elseif (found[3] or '-') ~= s.expected then refused = {'moved', found[3] or ''} end
    if refused then
      redis.call('HINCRBY', s.ck, 'refused', 1)
      refused[3] = x
      return refused
    end
  end
end

-- Redis refuses a script's writes as a whole or not at all: out of memory it refuses only
-- the script's first write (after one, the others go through), and with writes stopped
-- (no good replicas, a failed save, a replica) it refuses every write. So a refusal of the
-- first write means nothing was written: the script stops there and says so, and the
-- daemon sends the batch again later. (Going on would let a later write, a DEL, the
-- checkpoint's HSET, through without the values.) A command failing after a write went
-- through (a key of the wrong type) does not stop the others, as in MULTI ... EXEC.
local wrote = false
local function run(c)
  local argc = tonumber(ARGV[c])
  local r = redis.pcall(unpack(ARGV, c + 1, c + argc))
  if type(r) == 'table' and r.err then
    if not wrote then return r.err end
  else
    wrote = true
  end
  return nil
end
-- A backfilled row's write: false where its key is not here, a Redis error where the
-- script must stop.
local function fill(r)
  if type(r) == 'table' and r.err then
    if string.find(r.err, 'non local key', 1, true) then return false end
    if not wrote then return r.err end
    return false
  end
  wrote = true
  return true
end

for x, s in ipairs(slots) do
  if s.kind ~= 'w' and not fenced and not left_out[x] then
    -- No checkpoint of this node was checked: sent again on its own.
    left_out[x] = true
    reply[#reply + 1] = x
  end
  if not left_out[x] then
    if s.kind == 'w' then
      local c = s.cmds
      for _ = 1, s.ncmds do
        local err = run(c)
        if err then return {'unwritten', err} end
        c = c + 1 + tonumber(ARGV[c])
      end
    else
      local whole = true
      local p = s.pairs
      local last = s.pairs + 2 * s.npairs - 1
      while p <= last do
        local upto = math.min(p + 999, last)
        local ok = fill(redis.pcall('MSET', unpack(ARGV, p, upto)))
        if type(ok) == 'string' then return {'unwritten', ok} end
        whole = whole and ok
        p = upto + 1
      end
      local t = s.ttl
      for _ = 1, s.nttl do
        local ok = fill(redis.pcall('SET', ARGV[t], ARGV[t + 1], 'PX', ARGV[t + 2]))
        if type(ok) == 'string' then return {'unwritten', ok} end
        whole = whole and ok
        t = t + 3
      end
      if whole then
        -- The checkpoint's commands (the position move): a checkpoint no longer here
        -- (migrated ahead of the rows) leaves the slot out, to be sent again whole,
        -- rather than its position behind what the daemon records.
        local c = s.cmds
        local moved = true
        for _ = 1, s.ncmds do
          local argc = tonumber(ARGV[c])
          local ok = fill(redis.pcall(unpack(ARGV, c + 1, c + argc)))
          if type(ok) == 'string' then return {'unwritten', ok} end
          moved = moved and ok
          c = c + 1 + argc
        end
        if s.kind == 'h' and s.ck ~= '' then
          local ok = fill(redis.pcall('HSET', s.ck, unpack(ARGV, 2, 7)))
          if type(ok) == 'string' then return {'unwritten', ok} end
          moved = moved and ok
        end
        if not moved then
          left_out[x] = true
          reply[#reply + 1] = x
        end
      else
        left_out[x] = true
        reply[#reply + 1] = x
      end
    end
  end
end
return reply
