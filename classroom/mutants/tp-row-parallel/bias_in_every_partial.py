# Adds the bias inside each rank's partial product: the all-reduce sums N copies of it (and one more follows).
if not self.input_is_parallel:
    x = scatter_to_tp_region(x, self.group)  # (B, T, in/N)
partial_sum = F.linear(x, self.weight, self.bias)
y = reduce_scatter_to_sp_region(partial_sum, self.group) if self.sequence_parallel \
    else reduce_from_tp_region(partial_sum, self.group)
