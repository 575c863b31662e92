# Sums the gradients and forgets to divide by the world size: the step is N times too large (Adam hides most of it).
expert_ids = {id(p) for b in model.blocks if isinstance(b.mlp, ExpertParallelMoE) for p in b.mlp.experts.parameters()}
params = [p for p in model.parameters() if p.grad is not None]
for group, chosen in ((None, [p for p in params if id(p) not in expert_ids]),
                      (replica_group, [p for p in params if id(p) in expert_ids])):
    if not chosen:
        continue
    flat = torch.cat([p.grad.flatten() for p in chosen])
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    for p, g in zip(chosen, flat.split([p.numel() for p in chosen])):
        p.grad.copy_(g.view_as(p))
