# Never frees the unit after its forward: every gathered block stays in memory until backward, as if unsharded.
for t in out if isinstance(out, (tuple, list)) else [out]:
    if isinstance(t, torch.Tensor) and t.requires_grad:
        t.register_hook(lambda grad, u=unit: u.gather(self.group))
