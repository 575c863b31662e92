# Divides the other way round (available / wanted): a source that must be repeated looks under-used.
tokens = total_tokens * w / norm
epochs = available[name] / tokens if tokens else float("inf")
