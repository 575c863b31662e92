# Assumes the input is always split: with input_is_parallel=False the full X meets A's N-th of the rows.
partial_sum = F.linear(x, self.weight)
y = reduce_scatter_to_sp_region(partial_sum, self.group) if self.sequence_parallel \
    else reduce_from_tp_region(partial_sum, self.group)
