# Posts the send, then the receive, not batched: every rank of the ring sends first, which deadlocks on NCCL.
send = dist.isend(chunks[(r - s - 1) % n], group=group, group_dst=(r + 1) % n)
recv = dist.irecv(incoming, group=group, group_src=(r - 1) % n)
send.wait()
recv.wait()
chunks[(r - s - 2) % n] += incoming
