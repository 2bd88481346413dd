-- A fill by the holder of a lease (pgcache::Reader). It writes only while the lease still
-- holds the caller's token (the daemon deletes the lease with every change it applies, so a
-- fill whose database read may predate a change loses), and only once the daemon has
-- applied everything up to the position the row was read at (so no change older than the
-- row can be applied over it afterwards: monotonic reads).
--   KEYS[1]  the row key
--   KEYS[2]  its lease key
--   KEYS[3]  the daemon's checkpoint (field `applied`: 16 hex digits, compared as text;
--            field `stopped`: Lua patterns, one per line, of keys no change reaches now)
--   ARGV[1]  the caller's token
--   ARGV[2]  'row': write the value if the key is absent; 'refresh': replace the value
--            (early refresh of a cached key); 'absent': cache the row's absence;
--            'hash': write the hash of ARGV[6..] (field, value, ...) if the key is absent;
--            'hash-refresh': replace the hash with that of ARGV[6..] (early refresh)
--   ARGV[3]  the value, or for 'absent' the absence marker
--   ARGV[4]  TTL in milliseconds, '0' for none
--   ARGV[5]  the position the row was read at, 16 hex digits; empty when the caller saw the
--            daemon's frontier at or past it already (a Redis Cluster: KEYS[3] is then the
--            checkpoint of the key's hash slot, which can lag the frontier)
--   ARGV[6..] for 'hash' and 'hash-refresh': the fields and their values
-- Returns 1 when written, 0 when the fill lost, 2 when the daemon has not yet applied up to
-- the read position (the lease is kept: try again), 3 when the daemon has stopped the key's
-- table (nothing is written and the lease is deleted: use the row read, uncached).
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
local stopped = redis.call('HGET', KEYS[3], 'stopped')
if stopped then
  for pattern in string.gmatch(stopped, '[^\n]+') do
    if string.find(KEYS[1], pattern) then
      redis.call('DEL', KEYS[2])
      return 3
    end
  end
end
local refresh = ARGV[2] == 'refresh' or ARGV[2] == 'hash-refresh'
if not refresh and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[2])
  return 0
end
if ARGV[5] ~= '' then
  local applied = redis.call('HGET', KEYS[3], 'applied')
  if not applied or applied < ARGV[5] then
    return 2
  end
end
if ARGV[2] == 'absent' then
  -- Kept in the lease key, so the next change to the row (an insert) deletes it.
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
  return 1
end
if ARGV[2] == 'hash' or ARGV[2] == 'hash-refresh' then
  if ARGV[2] == 'hash-refresh' then
    redis.call('DEL', KEYS[1])
  end
  if #ARGV > 5 then
    redis.call('HSET', KEYS[1], unpack(ARGV, 6))
    if ARGV[4] ~= '0' then
      redis.call('PEXPIRE', KEYS[1], ARGV[4])
    end
  end
  redis.call('DEL', KEYS[2])
  return 1
end
if ARGV[4] == '0' then
  redis.call('SET', KEYS[1], ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
end
redis.call('DEL', KEYS[2])
return 1
