# `if` instead of `while`: at most one bucket launched per gradient, so complete buckets queue up behind a late one
# and the last of them wait for finish_gradient_synchronization(), after backward.
self._ready[i] += 1
if self._next < len(self.buckets) and self._ready[self._next] == len(self.buckets[self._next].params):
    self._in_flight.append(self._launch(self._next))
    self._next += 1
