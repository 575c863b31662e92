# Never frees the full gradients: the rank keeps 2Φ of gradients beside its shard, so stage 2 saves no memory.
flat = b.flatten(grads_or_zeros(b.params), b.params[0].dtype) / self.n  # (N·S,)
self.grad_shards[i] = torch.empty(b.shard_numel, dtype=flat.dtype, device=flat.device)
return dist.reduce_scatter_single(self.grad_shards[i], flat, group=self.group, async_op=True), lambda: flat
