-- Runs first in every write of the daemon, between WATCH on the checkpoint and MULTI. It
-- checks that the batch may be written:
--   * the checkpoint's epoch is the one this daemon read: otherwise Redis lost its data
--     (FLUSHALL, a restart without persistence) and the daemon must recover;
--   * its owner is this daemon's session: otherwise another daemon took the slot over and
--     this one is fenced off (a batch stuck on a slow link must not land late);
--   * its position is the one this daemon last wrote: otherwise Redis went back (a restore
--     from an older snapshot, a replica promoted) and the daemon must recover.
-- On failure it touches the checkpoint, which WATCH sees, so the EXEC that follows runs
-- nothing. If another daemon takes the checkpoint over between this check and the EXEC,
-- that too is a change WATCH sees.
--   KEYS[1]  the checkpoint hash
--   ARGV[1]  owner token   ARGV[2] epoch   ARGV[3] expected position ('-': none yet)
-- Returns {'ok'} or {'epoch'|'owner'|'moved', what was found}.
local found = redis.call('HMGET', KEYS[1], 'epoch', 'owner', 'lsn')
local refused
if found[1] ~= ARGV[2] then refused = {'epoch', found[1] or ''}
elseif found[2] ~= ARGV[1] then refused = {'owner', found[2] or ''}
elseif (found[3] or '-') ~= ARGV[3] then refused = {'moved', found[3] or ''} end
if refused then
  redis.call('HINCRBY', KEYS[1], 'refused', 1)
  return refused
end
return {'ok'}
