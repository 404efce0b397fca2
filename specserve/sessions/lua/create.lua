-- ARGV: ttl_ms, system turn JSON or ''
if redis.call('EXISTS', meta) == 1 then return {'EXISTS'} end
redis.call('DEL', turns, partial, ids)
redis.call('HSET', meta, 'created', ms(now), 'replica', '')
if ARGV[2] ~= '' then redis.call('RPUSH', turns, ARGV[2]) end
touch()
return snapshot()
