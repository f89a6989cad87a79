-- A caller's API request rate across every producer, as a token bucket kept in one key (the
-- generic cell rate algorithm). KEYS[1]: when the caller's bucket is full again, in µs of
-- Redis's clock, which every producer shares; KEYS[2], if given: the entry of the API key the
-- request carries, read here so the request needs no second round trip to authenticate.
-- ARGV[1]: µs per request (1 / rate); ARGV[2]: the burst, in requests. Returns {0, account}
-- having spent a request, or {µs until one is allowed, account}; account is the key's, or nil.
local account = KEYS[2] and redis.call('GET', KEYS[2]) or false
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local full_at = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now) + interval
local over = full_at - now - tonumber(ARGV[2]) * interval
if over > 0 then return {math.ceil(over), account} end
redis.call('SET', KEYS[1], string.format('%d', full_at), 'PX', math.ceil((full_at - now) / 1000))
return {0, account}
