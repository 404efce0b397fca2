-- ARGV: ttl_ms (unused). Read only: returns meta, turns, partial, ids and the server time.
if redis.call('EXISTS', meta) == 0 then return {'NOTFOUND'} end
local s = snapshot()
local p = redis.call('HMGET', partial, 'deadline', 'user', 'text')
return {'OK', s[2], s[3], s[4], s[5], {p[1] or '', p[2] or '', p[3] or ''},
        redis.call('LRANGE', ids, 0, -1), ms(now)}
