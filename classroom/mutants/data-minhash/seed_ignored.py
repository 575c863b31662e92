# Draws the permutations with the default seed instead of the caller's: signatures of other seeds never match.
a, b = permutation_params(num_perm, 1)
sig = np.full(num_perm, MAX_HASH, dtype=np.uint64)
for s in shingle_set:
    h = np.uint64(struct.unpack("<I", hashlib.sha1(s.encode("utf-8")).digest()[:4])[0])
    with np.errstate(over="ignore"):
        sig = np.minimum(sig, ((a * h + b) % np.uint64(MERSENNE_PRIME)) & np.uint64(MAX_HASH))
return sig
