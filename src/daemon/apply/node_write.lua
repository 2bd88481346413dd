-- The daemon's writes to many hash slots of one Redis Cluster master in one script: each
-- slot's part of a batch with that slot's checkpoint (the cluster apply's fast path). A
-- script runs whole on its node, so each slot's part lands whole, as with the guarded
-- transaction of one slot (WATCH, check, MULTI ... EXEC), for a fraction of the commands.
-- It declares no keys: a script without a shebang may touch keys of several slots as long
-- as they are all on its node, and Redis refuses any other (non-local, or absent from a
-- slot being migrated away), which the first pass uses to leave such a slot out.
--   ARGV[1]  owner token
--   then per slot: checkpoint, epoch, expected position ('-': none yet), key count, the
--   keys (every key and lease the part touches), command count, and per command its
--   argument count and arguments (the last ones set the checkpoint's fields).
-- First pass, nothing written: each slot's keys must all be here, else the slot is left
-- out (sent again on its own by the daemon, which follows the redirection); then each
-- remaining slot's checkpoint is checked as check.lua does, and a refusal writes nothing.
-- Second pass: the commands of every slot not left out.
-- Returns {'ok', index of each slot left out...}, {'epoch'|'owner'|'moved', found, index},
-- or {'unwritten', Redis's error} when Redis refused the first write (nothing written).
local token = ARGV[1]
local slots = {}
local i = 2
local n = #ARGV
while i <= n do
  local s = {ck = ARGV[i], epoch = ARGV[i + 1], expected = ARGV[i + 2]}
  s.nkeys = tonumber(ARGV[i + 3])
  s.keys = i + 4
  i = s.keys + s.nkeys
  s.ncmds = tonumber(ARGV[i])
  s.cmds = i + 1
  i = s.cmds
  for _ = 1, s.ncmds do i = i + 1 + tonumber(ARGV[i]) end
  slots[#slots + 1] = s
end

local reply = {'ok'}
local left_out = {}
for x, s in ipairs(slots) do
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
  if type(here) == 'table' then
    left_out[x] = true
    reply[#reply + 1] = x
  else
    local found = redis.call('HMGET', s.ck, 'epoch', 'owner', 'lsn')
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
for x, s in ipairs(slots) do
  if not left_out[x] then
    local c = s.cmds
    for _ = 1, s.ncmds do
      local argc = tonumber(ARGV[c])
      local r = redis.pcall(unpack(ARGV, c + 1, c + argc))
      if type(r) == 'table' and r.err then
        if not wrote then return {'unwritten', r.err} end
      else
        wrote = true
      end
      c = c + 1 + argc
    end
  end
end
return reply
