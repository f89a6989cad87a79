local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'gone'} end
if st ~= 'pending' and st ~= 'retrying' then return {st} end
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return {'queued'} end
redis.call('HSET', KEYS[1], 'status', 'pending', 'lease', ARGV[3])
redis.call('HDEL', KEYS[1], 'next_attempt')
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return {'go', redis.call('HGET', KEYS[1], 'attempts') or '0',
  redis.call('HGET', KEYS[1], 'first_attempt') or '',
  redis.call('GET', KEYS[3]) or '', redis.call('HGET', KEYS[4], ARGV[4]) or '',
  redis.call('HGET', KEYS[1], 'type') or '', redis.call('HGET', KEYS[1], 'cycle_start') or '0'}
