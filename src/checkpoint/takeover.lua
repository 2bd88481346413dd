-- A daemon that now holds the replication slot makes the checkpoint its own: from here on
-- every batch of a daemon with another owner token is refused (see apply.lua), so a daemon
-- that lost the slot cannot change Redis any more, however late its writes arrive.
--   KEYS[1]  the checkpoint hash
--   ARGV[1]  the new owner token
--   ARGV[2]  an epoch to set if the hash has none (Redis lost its data, or first start)
-- Returns the whole hash as it is afterwards (HGETALL), and whether the epoch was new.
local fresh = 0
if redis.call('HEXISTS', KEYS[1], 'epoch') == 0 then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[2])
  fresh = 1
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
return {fresh, redis.call('HGETALL', KEYS[1])}
