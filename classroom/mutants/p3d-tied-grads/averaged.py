# Averages the two copies' gradients instead of summing them: the tied weight's gradient is the sum of its two uses.
if stage.tied_weight is not None:
    dist.all_reduce(stage.tied_weight.grad, group=tied_group)
    stage.tied_weight.grad /= dist.get_world_size(tied_group)
