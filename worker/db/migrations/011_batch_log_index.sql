-- The batch log's GIN index without a pending list (issue 11, scale). With `fastupdate` on, the
-- rows a training or a fine-tune writes wait in an unordered pending list (up to 4 MB) that every
-- lookup scans until a vacuum merges it: at 10^5 rows the erasure's batch-log lookup took 12 ms,
-- 8x its cost at 10^4 or 10^6. Off, each insert goes straight into the tree, and a lookup stays
-- logarithmic in the log's size.
ALTER INDEX batch_log_samples_idx SET (fastupdate = off);
SELECT gin_clean_pending_list('batch_log_samples_idx');
