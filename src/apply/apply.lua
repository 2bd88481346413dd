-- One batch of the daemon's writes and the checkpoint that covers them, atomically.
--
-- The checks come first and refuse the whole batch, writing nothing:
--   * the checkpoint's epoch must be the one this daemon read: otherwise Redis lost its
--     data (FLUSHALL, a restart without persistence) and the daemon must recover;
--   * its owner must be this daemon's session: otherwise another daemon took the slot over
--     and this one is fenced off (a batch stuck on a slow link must not land late);
--   * its position must be the one this daemon last wrote: otherwise Redis went back (a
--     restore from an older snapshot) and the daemon must recover.
--
--   KEYS[1]  the checkpoint hash
--   ARGV[1]  owner token      ARGV[2] epoch      ARGV[3] expected position ('-': none yet)
--   ARGV[4]  new position (text LSN, '' to keep)  ARGV[5] the same as 16 hex digits
--   ARGV[6]  now (ms)         ARGV[7] number of extra checkpoint fields, then field, value...
--            (an empty value removes the field)
-- then the operations, each an opcode and its arguments:
--   M n r   MSET of n key/value pairs, then DEL of r lease keys
--   S k v ttl lease          SET k v [PX ttl], DEL lease ('' for none)
--   X k v lease              SET k v XX KEEPTTL (refresh mode), DEL lease
--   H k lease ttl cached n f v...   replace hash k (only if it exists when cached = '1')
--   D k lease                DEL k and its lease
--   K pattern pattern        delete every key matching either pattern (TRUNCATE)
--   J k base lease ttl cached repair n (name value)...
--           merge a JSON object: value '' keeps the field of the object under `base`
--   G k base lease ttl cached repair n (field tag value)...
--           merge a hash: tag 'v' sets the field, 'n' deletes it, 'u' keeps it
--           Without a usable base the key is deleted and, unless `cached` (refresh mode),
--           `repair` is kept in the checkpoint (field repair:<key>) until the row is read
--           again, so that a crash cannot leave the key absent for good.
-- Returns {'ok', merges that found no base (1-based, in order)} or {'epoch'|'owner'|'moved',
-- what was found}.
local ck = KEYS[1]
local found = redis.call('HMGET', ck, 'epoch', 'owner', 'lsn')
if found[1] ~= ARGV[2] then return {'epoch', found[1] or ''} end
if found[2] ~= ARGV[1] then return {'owner', found[2] or ''} end
if (found[3] or '-') ~= ARGV[3] then return {'moved', found[3] or ''} end

-- The top-level fields of a JSON object, as raw text: name (with its quotes) -> value.
-- The daemon's encoder writes no whitespace, so the object is a plain run of "k":v pairs.
local function fields(text)
  if string.sub(text, 1, 1) ~= '{' then return nil end
  local out = {}
  local i, n = 2, #text
  if string.sub(text, i, i) == '}' then return out end
  while i <= n do
    if string.sub(text, i, i) ~= '"' then return nil end
    local j = i + 1
    while true do
      j = string.find(text, '[\\"]', j)
      if not j then return nil end
      if string.sub(text, j, j) == '\\' then j = j + 2 else break end
    end
    local name = string.sub(text, i, j)
    if string.sub(text, j + 1, j + 1) ~= ':' then return nil end
    local s = j + 2
    local depth, k = 0, s
    while true do
      k = string.find(text, '[\\"{}%[%],]', k)
      if not k then return nil end
      local c = string.sub(text, k, k)
      if c == '"' then
        k = k + 1
        while true do
          k = string.find(text, '[\\"]', k)
          if not k then return nil end
          if string.sub(text, k, k) == '\\' then k = k + 2 else break end
        end
        k = k + 1
      elseif c == '{' or c == '[' then depth = depth + 1; k = k + 1
      elseif (c == '}' or c == ']') and depth > 0 then depth = depth - 1; k = k + 1
      elseif depth == 0 and (c == ',' or c == '}') then break
      else k = k + 1 end
    end
    out[name] = string.sub(text, s, k - 1)
    if string.sub(text, k, k) == '}' then return out end
    i = k + 1
  end
  return nil
end

local function revoke(lease)
  if lease ~= '' then redis.call('DEL', lease) end
end

local missing = {}
local merges = 0
local a = 8 + 2 * tonumber(ARGV[7])
local last = #ARGV
while a <= last do
  local op = ARGV[a]
  if op == 'M' then
    local n, r = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    redis.call('MSET', unpack(ARGV, a + 3, a + 2 + 2 * n))
    a = a + 3 + 2 * n
    if r > 0 then redis.call('DEL', unpack(ARGV, a, a + r - 1)) end
    a = a + r
  elseif op == 'S' then
    if ARGV[a + 3] == '' then
      redis.call('SET', ARGV[a + 1], ARGV[a + 2])
    else
      redis.call('SET', ARGV[a + 1], ARGV[a + 2], 'PX', ARGV[a + 3])
    end
    revoke(ARGV[a + 4])
    a = a + 5
  elseif op == 'X' then
    redis.call('SET', ARGV[a + 1], ARGV[a + 2], 'XX', 'KEEPTTL')
    revoke(ARGV[a + 3])
    a = a + 4
  elseif op == 'H' then
    local key, ttl, n = ARGV[a + 1], ARGV[a + 3], tonumber(ARGV[a + 5])
    local keep = -1
    if ARGV[a + 4] == '1' then keep = redis.call('PTTL', key) end
    if keep ~= -2 then
      redis.call('DEL', key)
      if n > 0 then
        redis.call('HSET', key, unpack(ARGV, a + 6, a + 5 + 2 * n))
        if keep > 0 then redis.call('PEXPIRE', key, keep)
        elseif ttl ~= '' then redis.call('PEXPIRE', key, ttl) end
      end
    end
    revoke(ARGV[a + 2])
    a = a + 6 + 2 * n
  elseif op == 'D' then
    redis.call('DEL', ARGV[a + 1])
    revoke(ARGV[a + 2])
    a = a + 3
  elseif op == 'K' then
    for p = a + 1, a + 2 do
      local cursor = '0'
      repeat
        local reply = redis.call('SCAN', cursor, 'MATCH', ARGV[p], 'COUNT', 1000)
        cursor = reply[1]
        if #reply[2] > 0 then redis.call('UNLINK', unpack(reply[2])) end
      until cursor == '0'
    end
    a = a + 3
  elseif op == 'J' or op == 'G' then
    merges = merges + 1
    local key, base, lease, ttl = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
    local cached, repair, n = ARGV[a + 5] == '1', ARGV[a + 6], tonumber(ARGV[a + 7])
    local width = 2
    if op == 'G' then width = 3 end
    local first = a + 8
    a = first + width * n
    local done = false
    if op == 'J' then
      local ok, text = pcall(redis.call, 'GET', base)
      local old = ok and text and fields(text)
      if old then
        local parts = {}
        for c = 0, n - 1 do
          local name, value = ARGV[first + 2 * c], ARGV[first + 2 * c + 1]
          if value == '' then value = old[name] end
          if not value then break end
          parts[#parts + 1] = name .. ':' .. value
        end
        if #parts == n then
          local merged = '{' .. table.concat(parts, ',') .. '}'
          if cached then
            redis.call('SET', key, merged, 'XX', 'KEEPTTL')
          elseif ttl == '' then
            redis.call('SET', key, merged)
          else
            redis.call('SET', key, merged, 'PX', ttl)
          end
          done = true
        end
      end
    else
      local ok, kind = pcall(redis.call, 'TYPE', base)
      if ok and (kind.ok or kind) == 'hash' then
        if base ~= key then
          redis.call('DEL', key)
          redis.call('RENAME', base, key)
        end
        for c = 0, n - 1 do
          local f, tag, v = ARGV[first + 3 * c], ARGV[first + 3 * c + 1], ARGV[first + 3 * c + 2]
          if tag == 'v' then redis.call('HSET', key, f, v)
          elseif tag == 'n' then redis.call('HDEL', key, f) end
        end
        if not cached and ttl ~= '' then redis.call('PEXPIRE', key, ttl) end
        done = true
      end
    end
    if not done then
      redis.call('DEL', key)
      if not cached then
        missing[#missing + 1] = merges
        redis.call('HSET', ck, 'repair:' .. key, repair)
      end
    end
    revoke(lease)
  else
    return redis.error_reply('pgcache apply: unknown operation ' .. tostring(op))
  end
end

local set = {'updated_ms', ARGV[6]}
if ARGV[4] ~= '' then
  set[#set + 1] = 'lsn'; set[#set + 1] = ARGV[4]
  set[#set + 1] = 'applied'; set[#set + 1] = ARGV[5]
end
for f = 8, 6 + 2 * tonumber(ARGV[7]), 2 do
  if ARGV[f + 1] == '' then
    redis.call('HDEL', ck, ARGV[f])
  else
    set[#set + 1] = ARGV[f]; set[#set + 1] = ARGV[f + 1]
  end
end
redis.call('HSET', ck, unpack(set))
return {'ok', missing}
