-- The miss path of pgcache::Reader, in one round trip: is the row cached now, and if not,
-- may this caller fill it?
--   KEYS[1]  the row key
--   KEYS[2]  its lease key (template::lease_key), which the daemon deletes with every change
--   ARGV[1]  the caller's random token
--   ARGV[2]  the lease TTL in milliseconds
--   ARGV[3]  the marker of a cached absence (negative caching keeps it in the lease key)
--   ARGV[4]  optional: 'hash' for a table stored as hashes (format = "hash")
-- Returns {1, value} when the row is cached (for a hash: {1, {field, value, ...}}), {2}
-- when the caller now holds the lease, {3} when another caller holds it, {4} when the row
-- is known to be absent.
if ARGV[4] == 'hash' then
  local fields = redis.call('HGETALL', KEYS[1])
  if #fields > 0 then
    return {1, fields}
  end
else
  local value = redis.call('GET', KEYS[1])
  if value then
    return {1, value}
  end
end
local holder = redis.call('GET', KEYS[2])
if not holder then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return {2}
end
if holder == ARGV[3] then
  return {4}
end
return {3}
