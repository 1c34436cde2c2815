"""The Lua scripts by which a fleet's servers (engine/fleet.py) change a job in Redis: each runs whole, with no other
client's command between its own, so that two servers never both take a job, nor both end it."""

# Submits a job: its hash, its place in the sorted sets and its entry in its model's stream, at once.
# KEYS: job hash, waiting, jobs, model stream, models, sequence, submitted; ARGV: id, model key, group, then the
# hash's fields.
ENQUEUE = """
local sequence = redis.call('INCR', KEYS[6])
local now = redis.call('TIME')
local created = now[1] + now[2] / 1000000
redis.call('HSET', KEYS[1], 'created', created, 'status', 'queued', 'model', ARGV[2], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], sequence, ARGV[1])
redis.call('ZADD', KEYS[3], sequence, ARGV[1])
redis.pcall('XGROUP', 'CREATE', KEYS[4], ARGV[3], '0', 'MKSTREAM')
redis.call('XADD', KEYS[4], '*', 'job', ARGV[1])
redis.call('SADD', KEYS[5], ARGV[2])
redis.call('XADD', KEYS[7], 'MAXLEN', '~', 100, '*', 'job', ARGV[1])
return tostring(created)
"""

# A server takes a job it read from a stream: the job's attempt counts up, and only that attempt's events are written
# from then on (WRITE), so that a server that comes back after its job was drawn again writes nothing. 0: the job
# has ended (cancelled while it waited) or is gone. KEYS: job hash, waiting; ARGV: id, server, consumer.
CLAIM = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'running', 'server', ARGV[2], 'consumer', ARGV[3])
return redis.call('HINCRBY', KEYS[1], 'attempt', 1)
"""

# Writes one event of the attempt ARGV[1], with Redis's time, or nothing (0) where the job was drawn again since. The
# end's status acknowledges and deletes the job's stream entry and starts its keys' TTL. KEYS: job hash, events, model
# stream; ARGV: attempt, event (JSON), a field stamped with the time or '', the end's status or '', TTL, group, entry
# id, then fields for the hash.
WRITE = """
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
if #ARGV > 7 then redis.call('HSET', KEYS[1], unpack(ARGV, 8)) end
local now = redis.call('TIME')
local at = now[1] + now[2] / 1000000
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], ARGV[3], at) end
redis.call('XADD', KEYS[2], '*', 'event', ARGV[2], 'at', at)
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'status', ARGV[4])
  redis.call('XACK', KEYS[3], ARGV[6], ARGV[7])
  redis.call('XDEL', KEYS[3], ARGV[7])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
return 1
"""

# Cancels a job from any server: a waiting one ends at once ('withdrawn'); a running one is marked, and the server
# drawing it stops it ('cancelling'); an ended one is left as it is (its status). KEYS: job hash, events, waiting;
# ARGV: id, reason, the Failed event (JSON), TTL.
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' then
  local now = redis.call('TIME')
  local at = now[1] + now[2] / 1000000
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished', at)
  redis.call('XADD', KEYS[2], '*', 'event', ARGV[3], 'at', at)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  return 'withdrawn'
end
if status ~= 'running' then return status end
redis.call('HSET', KEYS[1], 'cancel', ARGV[2])
return 'cancelling'
"""
