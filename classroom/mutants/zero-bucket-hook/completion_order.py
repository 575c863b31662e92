# Launches each bucket as soon as it is complete: ranks whose gradients arrive in another order launch the buckets
# in another order, and their all-reduces pair different buckets (NCCL needs the same order on every rank).
self._ready[i] += 1
if self._ready[i] == len(self.buckets[i].params):
    self._in_flight.append(self._launch(i))
    self._next += 1
