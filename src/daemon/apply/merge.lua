-- An update whose unchanged TOASTed columns were not sent: the new value takes them from
-- the value under `base` (the old key when the key changed), here, in stream order, inside
-- the daemon's MULTI. Without a usable base the key is deleted and, unless `cached`
-- (refresh mode, where absence is the normal state), `repair` is kept in the checkpoint
-- (field repair:<key>) until the daemon has read the row again, so that a crash cannot
-- leave the key absent for good.
--   KEYS[1] the key  KEYS[2] the base  KEYS[3] the key's lease  KEYS[4] the checkpoint
--   ARGV[1] 'J' (JSON), 'G' (hash), or 'X' (the cached value must not be merged into: it
--   may be in an older shape)  ARGV[2] TTL in ms ('' none)  ARGV[3] '1' if cached
--   ARGV[4] repair  ARGV[5] n, then per column:
--     J: name (with its quotes), value ('' keeps the base's)
--     G: field, tag ('v' set, 'n' delete, 'u' keep), value
-- Returns 1 when merged, 0 when the key was deleted instead.
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

local key, base, lease, ck = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ttl, cached, repair, n = ARGV[2], ARGV[3] == '1', ARGV[4], tonumber(ARGV[5])
local first = 6
local done = false
if ARGV[1] == 'J' then
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
elseif ARGV[1] == 'G' then
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
redis.call('DEL', lease)
if done then return 1 end
redis.call('DEL', key)
if not cached then redis.call('HSET', ck, 'repair:' .. key, repair) end
return 0
