-- ARGV: ttl_ms, turn token, complete ('1' or '0')
if redis.call('EXISTS', meta) == 0 then return {'NOTFOUND'} end
if not holds() then return {'BUSY'} end
finish(ARGV[3] == '1')
touch()
return snapshot()
