# Keeps the gradients on this rank: treats the all-to-all as if it were the identity.
return grad[: sum(ctx.send_splits)].contiguous(), None, None, None
