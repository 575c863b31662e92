# Keeps the permuted value mod 2^61 - 1 without masking it to 32 bits, so the values differ from datasketch's.
a, b = permutation_params(num_perm, seed)
sig = np.full(num_perm, MAX_HASH, dtype=np.uint64)
for s in shingle_set:
    h = np.uint64(struct.unpack("<I", hashlib.sha1(s.encode("utf-8")).digest()[:4])[0])
    with np.errstate(over="ignore"):
        sig = np.minimum(sig, (a * h + b) % np.uint64(MERSENNE_PRIME))
return sig
