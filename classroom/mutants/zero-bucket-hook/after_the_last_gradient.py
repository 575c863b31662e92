# Waits until every bucket is complete, then launches them all: correct averages, but nothing overlaps backward.
self._ready[i] += 1
if sum(self._ready) == sum(len(b.params) for b in self.buckets):
    for j in range(len(self.buckets)):
        self._in_flight.append(self._launch(j))
    self._next = len(self.buckets)
