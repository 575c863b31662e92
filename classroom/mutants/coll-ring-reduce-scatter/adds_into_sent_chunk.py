# Off by one: adds the incoming partial sum into the chunk it just sent instead of the one that arrived.
_exchange(chunks[(r - s - 1) % n], incoming, (r + 1) % n, (r - 1) % n, group)
chunks[(r - s - 1) % n] += incoming
