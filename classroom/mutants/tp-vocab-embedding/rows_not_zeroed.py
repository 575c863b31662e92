# Clamps foreign ids into range but keeps the rows it looked up: every rank adds a wrong row to the sum.
local = (idx - self.start).clamp(0, self.per_rank - 1)
x = F.embedding(local, self.weight)
return reduce_scatter_to_sp_region(x, self.group) if self.sequence_parallel \
    else reduce_from_tp_region(x, self.group)
