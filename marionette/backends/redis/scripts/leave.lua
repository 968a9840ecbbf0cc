-- A process leaves the cluster (the end of a stop): whatever it still holds is
-- released as a reaper would, and its records go. ARGV = K, ttl, proc.
reap(ARGV[3], now_ms())
check_idle()
return 1
