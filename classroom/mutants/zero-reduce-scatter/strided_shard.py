# All-reduces the bucket and keeps every N-th element (a strided slice) instead of the contiguous slice r that this
# rank's fp32 masters hold: the shard has the right size and the wrong elements.
flat = b.flatten(grads_or_zeros(b.params), b.params[0].dtype) / self.n  # (N·S,)
for p in b.params:
    p.grad = None
work = dist.all_reduce(flat, group=self.group, async_op=True)

def land():
    self.grad_shards[i] = flat.view(-1, self.n)[:, dist.get_rank(self.group)]  # (S,)
return work, land
