# Reduce-scatters the sum and forgets to divide by N: every step is N times too large (Adam hides it, SGD does not).
flat = b.flatten(grads_or_zeros(b.params), b.params[0].dtype)  # (N·S,)
for p in b.params:
    p.grad = None
self.grad_shards[i] = torch.empty(b.shard_numel, dtype=flat.dtype, device=flat.device)
return dist.reduce_scatter_single(self.grad_shards[i], flat, group=self.group, async_op=True), lambda: flat
