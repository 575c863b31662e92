# Off by one: treats id start + V/N, the next rank's first, as ours.
local = idx - self.start
outside = (local < 0) | (local > self.per_rank)
x = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
return reduce_scatter_to_sp_region(x, self.group) if self.sequence_parallel \
    else reduce_from_tp_region(x, self.group)
