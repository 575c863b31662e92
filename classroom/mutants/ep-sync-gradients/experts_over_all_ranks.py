# All-reduces every gradient over all ranks: experts on other ranks are different experts, not replicas.
params = [p for p in model.parameters() if p.grad is not None]
flat = torch.cat([p.grad.flatten() for p in params])
dist.all_reduce(flat)
flat /= world_size
for p, g in zip(params, flat.split([p.numel() for p in params])):
    p.grad.copy_(g.view_as(p))
