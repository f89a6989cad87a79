local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'gone' end
if st == 'pending' then return 'in_flight' end
if redis.call('EXPIRE', KEYS[3], ARGV[3]) == 0 then return 'expired' end
if st ~= 'retrying' then
  redis.call('HSET', KEYS[1], 'status', 'retrying', 'cycle_start', redis.call('HGET', KEYS[1], 'attempts') or '0')
  redis.call('HDEL', KEYS[1], 'first_attempt', 'reason')
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
redis.call('HSET', KEYS[1], 'next_attempt', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 'queued'
