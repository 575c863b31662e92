# Averages only the experts: the router, attention and embeddings keep each rank's own gradient and drift apart.
expert_ids = {id(p) for b in model.blocks if isinstance(b.mlp, ExpertParallelMoE) for p in b.mlp.experts.parameters()}
chosen = [p for p in model.parameters() if p.grad is not None and id(p) in expert_ids]
if chosen:
    flat = torch.cat([p.grad.flatten() for p in chosen])
    if dist.get_world_size(replica_group) > 1:
        dist.all_reduce(flat, group=replica_group)
    flat /= world_size
    for p, g in zip(chosen, flat.split([p.numel() for p in chosen])):
        p.grad.copy_(g.view_as(p))
