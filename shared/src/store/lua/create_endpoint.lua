if ARGV[4] ~= '' then
  local most = tonumber(redis.call('HGET', KEYS[5], ARGV[5]) or ARGV[4])
  if redis.call('HLEN', KEYS[2]) >= most then return most end
end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('SET', KEYS[3], ARGV[1])
redis.call('INCR', KEYS[4])
return 0
