-- The outbox is a queue: every row is inserted, updated two or three times (claim, settle, the
-- popup moving on to its history) and deleted after the retention. With the defaults
-- (autovacuum after 20 % of the table changed, analyze after 10 %) a large outbox carries many
-- dead row versions between visits, and the claim is planned on statistics that lag the
-- backlog. Visit it after 2 % (plus a floor), as queue tables usually are. The delivery sweep
-- also runs ANALYZE itself when the statistics lag far behind (a fresh table grows faster than
-- autovacuum's first visit; see OutboxStore.keep_statistics).
ALTER TABLE retailcrm_outbox SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_analyze_threshold = 1000
);
