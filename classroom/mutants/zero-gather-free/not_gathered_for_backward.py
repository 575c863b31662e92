# Frees the unit but never gathers it again: its backward finds the shards where the full parameters were.
unit.free()
