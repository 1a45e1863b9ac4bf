-- The usage a month's spend limit counts: billed amounts of its charges, never lowered by
-- credits or refunds (MonthlySpend on the write side counts the same). billed_micros stays the
-- net amount statements show. Spend checks read this column (or the Redis counter the billing
-- projector feeds from it), so it only ever grows within a month.
ALTER TABLE rm_monthly_spend ADD COLUMN charged_micros bigint NOT NULL DEFAULT 0;

UPDATE rm_monthly_spend AS m SET charged_micros = c.charged
FROM (
    SELECT workspace_id, month, sum(billed_micros) AS charged
    FROM rm_charges GROUP BY workspace_id, month
) AS c
WHERE m.workspace_id = c.workspace_id AND m.month = c.month;
