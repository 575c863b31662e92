# Sends to the previous rank and receives from the next: the chunk indices assume the other direction.
_exchange(chunks[(r - s - 1) % n], incoming, (r - 1) % n, (r + 1) % n, group)
chunks[(r - s - 2) % n] += incoming
